//! PostcopyState: where the destination is in the postcopy protocol.
//!
//! Kept global and atomic, not per incoming context, because QEMU's cleanup reads it while
//! the MigrationIncomingState is being freed.
use std::sync::atomic::{AtomicU32, Ordering};

/// The states, numbered as in QEMU's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum State {
    None = 0,
    Advise = 1,
    Discard = 2,
    Listening = 3,
    Running = 4,
    End = 5,
}

impl State {
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => State::None,
            1 => State::Advise,
            2 => State::Discard,
            3 => State::Listening,
            4 => State::Running,
            5 => State::End,
            _ => return None,
        })
    }
}

/// An atomically updated state cell.
#[derive(Debug, Default)]
pub struct StateCell(AtomicU32);

impl StateCell {
    pub const fn new() -> Self {
        StateCell(AtomicU32::new(State::None as u32))
    }

    /// Load-acquire, pairing with the release half of `set`.
    pub fn get(&self) -> State {
        State::from_raw(self.0.load(Ordering::Acquire)).unwrap_or(State::None)
    }

    /// Atomic exchange; returns the previous state.
    pub fn set(&self, new: State) -> State {
        State::from_raw(self.0.swap(new as u32, Ordering::AcqRel)).unwrap_or(State::None)
    }
}

/// The process-wide postcopy state QEMU's header exposes.
pub static POSTCOPY_STATE: StateCell = StateCell::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_returns_old_state_and_get_sees_new() {
        let cell = StateCell::new();
        assert_eq!(cell.get(), State::None);
        assert_eq!(cell.set(State::Advise), State::None);
        assert_eq!(cell.set(State::Listening), State::Advise);
        assert_eq!(cell.get(), State::Listening);
    }

    #[test]
    fn raw_values_match_qemu_numbering() {
        for raw in 0..6 {
            assert_eq!(State::from_raw(raw).map(|s| s as u32), Some(raw));
        }
        assert_eq!(State::from_raw(6), None);
        assert_eq!(State::from_raw(1234), None);
    }

    #[test]
    fn concurrent_exchanges_lose_no_transition() {
        let cell = std::sync::Arc::new(StateCell::new());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let cell = cell.clone();
                std::thread::spawn(move || {
                    let mut seen = [0u32; 6];
                    for n in 0..10_000u32 {
                        let new = State::from_raw((i + n) % 6).unwrap();
                        seen[cell.set(new) as usize] += 1;
                    }
                    seen
                })
            })
            .collect();
        let total: u32 = threads
            .into_iter()
            .map(|t| t.join().unwrap().iter().sum::<u32>())
            .sum();
        // Every exchange returned exactly one previous value.
        assert_eq!(total, 40_000);
    }
}
