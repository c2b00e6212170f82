//! Subject, stream and consumer names: built and parsed here and nowhere else.
//!
//! ```text
//! yeongye.in.<agency>.referral      agency -> broker   (stream YEONGYE_IN)
//! yeongye.in.<agency>.status        agency -> broker   (stream YEONGYE_IN)
//! yeongye.in.<agency>.consent       agency -> broker   (stream YEONGYE_IN)
//! yeongye.in.<agency>.purge         agency -> broker   (stream YEONGYE_IN)
//! yeongye.out.<agency>.delivery     broker -> agency   (stream YEONGYE_OUT)
//! yeongye.out.<agency>.notification broker -> agency   (stream YEONGYE_OUT)
//! yeongye.out.<agency>.rejection    broker -> agency   (stream YEONGYE_OUT)
//! yeongye.out.<agency>.escalation   broker -> agency   (stream YEONGYE_OUT)
//! yeongye.out.<agency>.withdrawal   broker -> agency   (stream YEONGYE_OUT)
//! yeongye.query.<agency>            agency -> broker   (core NATS request/reply)
//! ```

/// The stream of everything agencies send to the broker.
pub const IN_STREAM: &str = "YEONGYE_IN";
/// The stream of everything the broker sends to agencies.
pub const OUT_STREAM: &str = "YEONGYE_OUT";
/// Subjects captured by [`IN_STREAM`].
pub const IN_SUBJECTS: &str = "yeongye.in.>";
/// Subjects captured by [`OUT_STREAM`].
pub const OUT_SUBJECTS: &str = "yeongye.out.>";
/// Subjects the broker answers status queries on.
pub const QUERY_SUBJECTS: &str = "yeongye.query.*";
/// The broker's durable consumer on [`IN_STREAM`].
pub const BROKER_CONSUMER: &str = "broker";

/// Longest agency id accepted.
pub const MAX_AGENCY_ID_LEN: usize = 64;

/// What an agency sends on `yeongye.in.<agency>.<kind>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InKind {
    Referral,
    Status,
    /// Consent grants and revocations.
    Consent,
    /// Purge confirmations for withdrawn referrals.
    Purge,
}

/// What the broker sends on `yeongye.out.<agency>.<kind>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    Delivery,
    Notification,
    Rejection,
    Escalation,
    Withdrawal,
}

impl InKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InKind::Referral => "referral",
            InKind::Status => "status",
            InKind::Consent => "consent",
            InKind::Purge => "purge",
        }
    }
}

impl OutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutKind::Delivery => "delivery",
            OutKind::Notification => "notification",
            OutKind::Rejection => "rejection",
            OutKind::Escalation => "escalation",
            OutKind::Withdrawal => "withdrawal",
        }
    }

    pub fn parse(s: &str) -> Option<OutKind> {
        match s {
            "delivery" => Some(OutKind::Delivery),
            "notification" => Some(OutKind::Notification),
            "rejection" => Some(OutKind::Rejection),
            "escalation" => Some(OutKind::Escalation),
            "withdrawal" => Some(OutKind::Withdrawal),
            _ => None,
        }
    }
}

/// An agency id is 1 to 64 characters of `a-z`, `0-9` and `-`, starting with a letter or digit:
/// it is used as a NATS subject token, a consumer name and a file name, so nothing else is allowed.
pub fn is_valid_agency_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_AGENCY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

pub fn inbound(agency: &str, kind: InKind) -> String {
    format!("yeongye.in.{agency}.{}", kind.as_str())
}

pub fn outbound(agency: &str, kind: OutKind) -> String {
    format!("yeongye.out.{agency}.{}", kind.as_str())
}

/// Everything one agency may send to the broker: its NATS user's publish permission.
pub fn inbound_filter(agency: &str) -> String {
    format!("yeongye.in.{agency}.>")
}

/// Everything addressed to one agency: its consumer's filter.
pub fn outbound_filter(agency: &str) -> String {
    format!("yeongye.out.{agency}.>")
}

pub fn query(agency: &str) -> String {
    format!("yeongye.query.{agency}")
}

/// The durable consumer through which an agency reads its deliveries.
pub fn agency_consumer(agency: &str) -> String {
    format!("agency-{agency}")
}

/// The inbox prefix an agency's connection uses (`custom_inbox_prefix`): its NATS user may
/// subscribe below it and nowhere else, so PubAcks, query replies and pull-request deliveries
/// for that agency arrive there and only there.
pub fn inbox_prefix(agency: &str) -> String {
    format!("_INBOX_{agency}")
}

/// The only reply subjects the broker answers a query from `agency` on: below the agency's own
/// inbox prefix (`_INBOX_<agency>.<token>[.<token>...]`), each token non-empty, no wildcard, no
/// white space. Anything else — a JetStream API subject, another agency's subjects or inbox —
/// would make the broker publish where the asker may not (a confused deputy).
pub fn is_own_inbox(agency: &str, reply: &str) -> bool {
    let prefix = inbox_prefix(agency);
    let Some(rest) = reply
        .strip_prefix(prefix.as_str())
        .and_then(|r| r.strip_prefix('.'))
    else {
        return false;
    };
    is_valid_agency_id(agency)
        && reply.len() <= 255
        && rest.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && t.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        })
}

/// An inbound subject taken apart. `agency` is the raw token (check it with
/// [`is_valid_agency_id`] and the registry); `kind` is `None` for a kind the broker does not serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound<'a> {
    pub agency: &'a str,
    pub kind: Option<InKind>,
}

/// Parses `yeongye.in.<agency>.<kind>`. `None` if the subject is not of that shape at all.
pub fn parse_inbound(subject: &str) -> Option<Inbound<'_>> {
    let rest = subject.strip_prefix("yeongye.in.")?;
    let (agency, kind) = rest.split_once('.')?;
    if agency.is_empty() || kind.contains('.') {
        return None;
    }
    let kind = match kind {
        "referral" => Some(InKind::Referral),
        "status" => Some(InKind::Status),
        "consent" => Some(InKind::Consent),
        "purge" => Some(InKind::Purge),
        _ => None,
    };
    Some(Inbound { agency, kind })
}

/// Parses `yeongye.query.<agency>`, returning the agency token.
pub fn parse_query(subject: &str) -> Option<&str> {
    let agency = subject.strip_prefix("yeongye.query.")?;
    (!agency.is_empty() && !agency.contains('.')).then_some(agency)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_inbox_only() {
        assert!(is_own_inbox("cc-1", "_INBOX_cc-1.abc.def"));
        assert!(is_own_inbox("cc-1", "_INBOX_cc-1.X9"));
        for hostile in [
            "$JS.API.STREAM.PURGE.YEONGYE_OUT",
            "$JS.API.STREAM.PURGE.YEONGYE_IN",
            "yeongye.in.hope.referral",
            "yeongye.out.hope.delivery",
            "_INBOX_hope.abc",
            "_INBOX_cc-10.abc",
            "_INBOX_cc-1",
            "_INBOX_cc-1.",
            "_INBOX_cc-1..x",
            "_INBOX_cc-1.>",
            "_INBOX_cc-1.*",
            "_INBOX_cc-1.a*b",
            "_INBOX_cc-1.a b",
            "_INBOX_cc-1.a\tb",
            "_INBOX.abc",
            "",
        ] {
            assert!(!is_own_inbox("cc-1", hostile), "{hostile:?}");
        }
        assert!(!is_own_inbox(
            "cc-1",
            &format!("_INBOX_cc-1.{}", "x".repeat(300))
        ));
        assert!(!is_own_inbox("Bad.Id", "_INBOX_Bad.Id.x"));
    }

    #[test]
    fn agency_ids() {
        for ok in ["hope-support", "cc1", "a", "0x"] {
            assert!(is_valid_agency_id(ok), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "-x",
            "Hope",
            "a.b",
            "a*",
            "a>",
            "희망",
            "a b",
            long.as_str(),
        ] {
            assert!(!is_valid_agency_id(bad), "{bad}");
        }
    }

    #[test]
    fn inbound_round_trip() {
        let s = inbound("cc-1", InKind::Status);
        assert_eq!(
            parse_inbound(&s),
            Some(Inbound {
                agency: "cc-1",
                kind: Some(InKind::Status)
            })
        );
        assert_eq!(
            parse_inbound("yeongye.in.cc-1.bogus"),
            Some(Inbound {
                agency: "cc-1",
                kind: None
            })
        );
        assert_eq!(parse_inbound("yeongye.in.cc-1"), None);
        assert_eq!(parse_inbound("yeongye.in.cc-1.status.x"), None);
        assert_eq!(parse_inbound("yeongye.out.cc-1.status"), None);
        assert_eq!(parse_query("yeongye.query.cc-1"), Some("cc-1"));
        assert_eq!(parse_query("yeongye.query."), None);
    }
}
