//! Exhaustive tests of the state machine (filled in with the table test).
