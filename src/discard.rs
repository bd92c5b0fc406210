//! Outgoing discard batching (source side): the bitmap code reports ranges of target pages
//! that the destination must drop; they go out in commands of at most 12 ranges.
use crate::error::{Error, Result};

/// Ranges per MIG_CMD_POSTCOPY_RAM_DISCARD command (about 200 bytes on the wire).
pub const MAX_DISCARDS_PER_COMMAND: usize = 12;

/// The discard state of one RAM block being sent: QEMU's PostcopyDiscardState.
#[derive(Debug)]
pub struct DiscardBatch {
    name: String,
    target_page_size: u64,
    pending: Vec<(u64, u64)>,
    /// Ranges accepted for this block.
    pub ranges: u64,
    /// Commands sent for this block.
    pub commands: u64,
}

impl DiscardBatch {
    pub fn new(name: &str, target_page_size: u64) -> Self {
        DiscardBatch {
            name: name.to_owned(),
            target_page_size: target_page_size.max(1),
            pending: Vec::with_capacity(MAX_DISCARDS_PER_COMMAND),
            ranges: 0,
            commands: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues `[start, start + length)` target pages, sending a command when 12 are queued.
    pub fn add_range<F>(&mut self, start: u64, length: u64, send: F) -> Result<()>
    where
        F: FnMut(&str, &[(u64, u64)]) -> std::result::Result<(), i32>,
    {
        let tps = self.target_page_size;
        let bytes = |v: u64, what: &str| {
            v.checked_mul(tps).ok_or_else(|| {
                Error::InvalidArgument(format!("discard {what} {v} pages overflows 64-bit bytes"))
            })
        };
        if length == 0 {
            return Err(Error::InvalidArgument("discard range of length 0".into()));
        }
        let (start_b, len_b) = (bytes(start, "start")?, bytes(length, "length")?);
        start_b
            .checked_add(len_b)
            .ok_or_else(|| Error::InvalidArgument("discard range end overflows".into()))?;
        self.pending.push((start_b, len_b));
        self.ranges += 1;
        if self.pending.len() == MAX_DISCARDS_PER_COMMAND {
            self.flush(send)?;
        }
        Ok(())
    }

    /// Sends whatever is queued (the block's last, partial command).
    pub fn finish<F>(&mut self, send: F) -> Result<()>
    where
        F: FnMut(&str, &[(u64, u64)]) -> std::result::Result<(), i32>,
    {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.flush(send)
    }

    fn flush<F>(&mut self, mut send: F) -> Result<()>
    where
        F: FnMut(&str, &[(u64, u64)]) -> std::result::Result<(), i32>,
    {
        let result = send(&self.name, &self.pending);
        // The batch is consumed either way: a failed send fails the migration, and
        // re-sending old ranges with new ones would duplicate them.
        self.pending.clear();
        self.commands += 1;
        result.map_err(|errno| Error::Host {
            what: "sending a discard command",
            errno,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_of_twelve_in_bytes_and_a_partial_tail() {
        let mut sent: Vec<(String, Vec<(u64, u64)>)> = Vec::new();
        let mut batch = DiscardBatch::new("pc.ram", 4096);
        for i in 0..30u64 {
            batch
                .add_range(i * 10, i + 1, |n, r| {
                    sent.push((n.to_owned(), r.to_vec()));
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(sent.len(), 2);
        batch
            .finish(|n, r| {
                sent.push((n.to_owned(), r.to_vec()));
                Ok(())
            })
            .unwrap();
        assert_eq!(
            sent.iter().map(|(_, r)| r.len()).collect::<Vec<_>>(),
            vec![12, 12, 6]
        );
        assert_eq!(sent[0].1[0], (0, 4096));
        assert_eq!(sent[2].1[5], (290 * 4096, 30 * 4096));
        assert!(sent.iter().all(|(n, _)| n == "pc.ram"));
        assert_eq!((batch.ranges, batch.commands), (30, 3));
    }

    #[test]
    fn finish_with_nothing_queued_sends_nothing() {
        let mut batch = DiscardBatch::new("b", 4096);
        batch.finish(|_, _| panic!("nothing to send")).unwrap();
        assert_eq!(batch.commands, 0);
    }

    #[test]
    fn overflow_and_empty_ranges_are_rejected() {
        let mut batch = DiscardBatch::new("b", 4096);
        assert!(batch.add_range(u64::MAX / 2, 1, |_, _| Ok(())).is_err());
        assert!(batch.add_range(1, 0, |_, _| Ok(())).is_err());
        assert_eq!(batch.ranges, 0);
    }

    #[test]
    fn send_failure_is_reported_with_errno() {
        let mut batch = DiscardBatch::new("b", 4096);
        for i in 0..11 {
            batch.add_range(i, 1, |_, _| Ok(())).unwrap();
        }
        let err = batch.add_range(11, 1, |_, _| Err(libc::EPIPE)).unwrap_err();
        assert_eq!(err.errno(), libc::EPIPE);
    }
}
