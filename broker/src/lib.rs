//! `referral-broker`: validates, routes and tracks Yeongye referrals durably.
//!
//! # Layout
//! - [`referral`]: the pure state machine (no I/O).

pub mod referral;
