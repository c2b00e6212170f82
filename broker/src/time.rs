//! Time as the broker's pure modules count it: milliseconds since the Unix epoch, a plain
//! number passed in as an argument. Reading the clock is `clock.rs`'s job alone; this module
//! only names the unit, so that the state machine and the consent rules share it without
//! importing each other.

/// Milliseconds since the Unix epoch.
pub type Millis = i64;
