//! The demo's wire protocol: 16-byte little-endian frame headers, some followed by a payload.
//!
//! One or two TCP connections join a source and a destination, as in QEMU:
//! - the main channel carries the RAM stream (precopy pages, discards, the switchover, the
//!   background postcopy stream, checksums, statistics) from the source, and the return path
//!   (progress, page requests, the final report, errors) from the destination. Without
//!   preempt (QEMU's vanilla postcopy) the requested pages come back on it too, flagged
//!   `FLAG_URGENT` and queued with the background stream;
//! - with preempt, a second connection (the preempt channel, opened through the library's
//!   postcopy_preempt_* entrypoints) carries only the requested pages, so a demand fault
//!   never waits behind the background stream.
//!
//! After a broken connection in postcopy the source connects again with a HELLO marked
//! `resume`; the destination answers with RESUME (the pages it holds), the source opens a
//! new preempt channel (with preempt), and both carry on from there.
//!
//! Header: `kind: u8, flags: u8, reserved: u16, block: u32, arg: u64`. Pages carry exactly
//! one block page of data (the page size both sides agreed in HELLO); other payloads carry
//! their length in `arg`.
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;

pub const HEADER_LEN: usize = 16;
pub const VERSION: u64 = 2;
/// Header flag of a page sent because the destination asked for it.
pub const FLAG_URGENT: u8 = 1;
/// Payloads with a length field are bounded, so a corrupt header cannot make us allocate
/// without limit (a checksum list of 1 TiB of 4 KiB pages in one block is 2 GiB: we send
/// checksums in chunks well below this).
pub const MAX_PAYLOAD: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Either channel, first frame: JSON `{channel, version, config, resume}`.
    Hello = 1,
    /// Destination: RAM allocated, postcopy_ram_incoming_init done; precopy may start.
    Ready = 2,
    /// One page of `block` at byte `arg`, followed by its data.
    Page = 3,
    /// One page of `block` at byte `arg` that is all zero: no data follows.
    Zero = 4,
    /// Discard ranges of `block`: `arg` bytes of (start, length) u64 byte pairs follow.
    Discard = 5,
    /// Switchover: the source's guest is stopped; the destination starts postcopy.
    Listen = 6,
    /// The background stream has sent every page that was still missing, and the
    /// checksums: the destination finishes, then reports.
    StreamEnd = 7,
    /// Checksums of pages of `block`: `arg` bytes of u64s follow, the index of the first
    /// page, then one checksum per page.
    Checksums = 8,
    /// The source's statistics, JSON of `arg` bytes: its last frame, after the report.
    SourceStats = 9,
    /// Destination, return path: please send page of `block` at byte `arg` now.
    Request = 10,
    /// Destination: `arg` pages are in place; `block` is the phase (see `Phase`).
    Progress = 11,
    /// Destination: the final report (JSON of `arg` bytes).
    Report = 12,
    /// Either side: it is giving up; the message (`arg` bytes, UTF-8) says why.
    Failed = 13,
    /// Destination, first frame on a resumed main channel: the pages it holds, a bitmap of
    /// `arg` bytes (u64 words, bit g of word g / 64 for global page g).
    Resume = 14,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Ready,
            3 => Page,
            4 => Zero,
            5 => Discard,
            6 => Listen,
            7 => StreamEnd,
            8 => Checksums,
            9 => SourceStats,
            10 => Request,
            11 => Progress,
            12 => Report,
            13 => Failed,
            14 => Resume,
            _ => return None,
        })
    }

    /// Whether `arg` is the length of a payload that follows.
    fn has_sized_payload(self) -> bool {
        matches!(
            self,
            Kind::Hello
                | Kind::Discard
                | Kind::Checksums
                | Kind::SourceStats
                | Kind::Report
                | Kind::Failed
                | Kind::Resume
        )
    }
}

/// What the destination is doing, for the source's progress bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Precopy = 0,
    Postcopy = 1,
    Finishing = 2,
}

impl Phase {
    pub fn from_u32(v: u32) -> Phase {
        match v {
            0 => Phase::Precopy,
            1 => Phase::Postcopy,
            _ => Phase::Finishing,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// FLAG_* bits.
    pub flags: u8,
    pub block: u32,
    pub arg: u64,
}

impl Header {
    pub fn new(kind: Kind, block: u32, arg: u64) -> Header {
        Header {
            kind,
            flags: 0,
            block,
            arg,
        }
    }

    /// A page (or zero page) sent because the destination asked for it.
    pub fn urgent(kind: Kind, block: u32, arg: u64) -> Header {
        Header {
            flags: FLAG_URGENT,
            ..Header::new(kind, block, arg)
        }
    }

    pub fn is_urgent(&self) -> bool {
        self.flags & FLAG_URGENT != 0
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.block.to_le_bytes());
        b[8..16].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> io::Result<Header> {
        let kind = Kind::from_u8(b[0]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown frame kind {} (not a postcopy-demo peer?)", b[0]),
            )
        })?;
        let block = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        let arg = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let h = Header {
            kind,
            flags: b[1],
            block,
            arg,
        };
        if kind.has_sized_payload() && arg > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{kind:?} frame announces {arg} bytes, more than the protocol allows"),
            ));
        }
        Ok(h)
    }

    /// The payload length of a frame with a sized payload, else 0.
    pub fn payload_len(&self) -> usize {
        if self.kind.has_sized_payload() {
            self.arg as usize
        } else {
            0
        }
    }
}

/// The reading half of a channel.
pub struct FrameReader {
    inner: BufReader<TcpStream>,
}

impl FrameReader {
    pub fn new(stream: TcpStream) -> FrameReader {
        FrameReader {
            inner: BufReader::with_capacity(256 << 10, stream),
        }
    }

    /// The next header; `Ok(None)` at a clean end of stream (the peer closed between frames).
    pub fn next_header(&mut self) -> io::Result<Option<Header>> {
        if self.inner.fill_buf()?.is_empty() {
            return Ok(None);
        }
        let mut b = [0u8; HEADER_LEN];
        self.inner.read_exact(&mut b)?;
        Header::decode(&b).map(Some)
    }

    /// The sized payload of `h`.
    pub fn payload(&mut self, h: &Header) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; h.payload_len()];
        self.inner.read_exact(&mut v)?;
        Ok(v)
    }

    /// Reads exactly `buf.len()` bytes of page data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf)
    }
}

/// The writing half of a channel.
pub struct FrameWriter {
    inner: BufWriter<TcpStream>,
}

impl FrameWriter {
    pub fn new(stream: TcpStream) -> FrameWriter {
        FrameWriter {
            inner: BufWriter::with_capacity(256 << 10, stream),
        }
    }

    pub fn header(&mut self, h: Header) -> io::Result<()> {
        self.inner.write_all(&h.encode())
    }

    /// A frame with no payload.
    pub fn frame(&mut self, kind: Kind, block: u32, arg: u64) -> io::Result<()> {
        self.header(Header::new(kind, block, arg))
    }

    /// A frame with a sized payload.
    pub fn sized(&mut self, kind: Kind, block: u32, payload: &[u8]) -> io::Result<()> {
        self.header(Header::new(kind, block, payload.len() as u64))?;
        self.inner.write_all(payload)
    }

    /// A page frame and its data.
    pub fn page(&mut self, block: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.header(Header::new(Kind::Page, block, offset))?;
        self.inner.write_all(data)
    }

    /// Bytes already framed (a header and its data).
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Sends one frame and flushes: for messages that must leave now (requests, progress).
pub fn send_now(stream: &TcpStream, h: Header, payload: &[u8]) -> io::Result<()> {
    let mut w = stream;
    if payload.is_empty() {
        w.write_all(&h.encode())
    } else {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&h.encode());
        buf.extend_from_slice(payload);
        w.write_all(&buf)
    }
}

/// Encodes (start, length) byte pairs for a Discard frame.
pub fn encode_pairs(pairs: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(pairs.len() * 16);
    for (a, b) in pairs {
        v.extend_from_slice(&a.to_le_bytes());
        v.extend_from_slice(&b.to_le_bytes());
    }
    v
}

pub fn decode_u64s(payload: &[u8]) -> io::Result<Vec<u64>> {
    if payload.len() % 8 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "payload is not a whole number of 64-bit words",
        ));
    }
    Ok(payload
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

pub fn encode_u64s(words: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(words.len() * 8);
    for w in words {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// Tunes a channel socket: no Nagle delay (requests and urgent pages are small and must go
/// at once).
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header::new(Kind::Page, 7, 0x1234_5678_9000);
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let u = Header::urgent(Kind::Zero, 2, 0x3000);
        assert!(u.is_urgent() && !h.is_urgent());
        assert_eq!(Header::decode(&u.encode()).unwrap(), u);
        let mut bad = h.encode();
        bad[0] = 99;
        assert!(Header::decode(&bad).is_err());
        let big = Header::new(Kind::Report, 0, MAX_PAYLOAD + 1);
        assert!(Header::decode(&big.encode()).is_err());
    }

    #[test]
    fn words_round_trip() {
        let w = [1u64, u64::MAX, 42];
        assert_eq!(decode_u64s(&encode_u64s(&w)).unwrap(), w);
        assert_eq!(
            decode_u64s(&encode_pairs(&[(1, 2), (3, 4)])).unwrap(),
            [1, 2, 3, 4]
        );
        assert!(decode_u64s(&[0u8; 9]).is_err());
    }
}
