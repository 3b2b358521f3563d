//! Fault injection for tests: reads of a chosen channel wait inside the read pool until
//! released, so a test can show what else still runs while a store read is stuck.
//!
//! It owns only the set of held channels. It is compiled only for this crate's tests and
//! with the non-default `fault-hooks` feature, and must never be enabled in a build that
//! serves.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

/// The held channels, with how many reads of each wait now.
#[derive(Default)]
pub(crate) struct Holds {
    state: Mutex<HashMap<String, Held>>,
    released: Condvar,
}

#[derive(Default)]
struct Held {
    /// Guards holding the channel (reads pass once it is 0).
    guards: usize,
    /// Reads waiting now.
    waiting: usize,
}

impl Holds {
    /// Blocks the calling (pool) thread while `channel` is held.
    pub(crate) fn wait(&self, channel: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let held = |s: &HashMap<String, Held>| s.get(channel).is_some_and(|h| h.guards > 0);
        if !held(&state) {
            return;
        }
        state.get_mut(channel).expect("held").waiting += 1;
        while held(&state) {
            state = self.released.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(h) = state.get_mut(channel) {
            h.waiting -= 1;
        }
    }
}

/// Holds the reads of one channel while it lives ([`crate::Store::hold_reads`]).
pub struct ReadHold {
    holds: Arc<Holds>,
    channel: String,
}

impl ReadHold {
    pub(crate) fn new(holds: Arc<Holds>, channel: &str) -> Self {
        holds.state.lock().unwrap_or_else(|e| e.into_inner()).entry(channel.to_string()).or_default().guards += 1;
        Self { holds, channel: channel.to_string() }
    }

    /// How many reads of the channel wait now.
    pub fn waiting(&self) -> usize {
        let state = self.holds.state.lock().unwrap_or_else(|e| e.into_inner());
        state.get(&self.channel).map_or(0, |h| h.waiting)
    }
}

impl Drop for ReadHold {
    fn drop(&mut self) {
        let mut state = self.holds.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = state.get_mut(&self.channel) {
            h.guards -= 1;
        }
        drop(state);
        self.holds.released.notify_all();
    }
}
