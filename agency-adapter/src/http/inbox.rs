//! The pull side of incoming items, for agency systems that cannot receive calls:
//! `GET /v1/inbox` lists what waits (oldest first), `POST /v1/inbox/{message_id}/ack` takes one.
//!
//! Items wait in the durable [`Queue`](super::queue::Queue) in either delivery mode; in webhook
//! mode the list shows what the webhook has not yet delivered. Acknowledging is idempotent
//! (`"already": true` the second time) and, for a delivery or a withdrawal, lets the adapter
//! send its follow-up: the `RECEIVED` receipt, or the purge confirmation — so acknowledge a
//! delivery once the system durably has it, and a withdrawal once the client's data is purged.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::info;

use super::AppState;
use super::backend::Backend;
use super::problem::{Problem, ProblemType};
use super::queue::Taken;
use super::routes::respond;

/// Items listed per request by default, and at most.
pub(crate) const DEFAULT_LIMIT: usize = 100;
pub(crate) const MAX_LIMIT: usize = 1000;
/// Longest message id accepted in the path.
const MAX_MESSAGE_ID_LEN: usize = 128;

/// `GET /v1/inbox[?limit=N]`: `{"items": [...], "pending": <total>}`.
pub(crate) async fn list<B: Backend>(
    State(st): State<AppState<B>>,
    RawQuery(query): RawQuery,
) -> Response {
    respond(async {
        let limit = parse_limit(query.as_deref())?;
        let entries = st.queue.pending(limit).await?;
        let items: Vec<_> = entries.iter().map(|(_, e)| e.document()).collect();
        Ok((
            StatusCode::OK,
            axum::Json(json!({ "items": items, "pending": st.queue.pending_len() })),
        )
            .into_response())
    })
    .await
}

/// `POST /v1/inbox/{message_id}/ack`: `{"message_id": .., "already": bool}`; 404 if no such
/// item was ever queued.
pub(crate) async fn ack<B: Backend>(
    State(st): State<AppState<B>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    respond(async {
        let bad = || {
            Problem::new(
                ProblemType::InvalidParameter,
                "message_id must be 1-128 visible ASCII characters",
            )
            .field("message_id")
        };
        let Path(id) = id.map_err(|_| bad())?;
        if id.is_empty()
            || id.len() > MAX_MESSAGE_ID_LEN
            || !id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(bad());
        }
        let already = match st.queue.take(&id).await? {
            Taken::Now => {
                info!(message_id = %id, "item acknowledged by the agency system");
                st.wake.notify_one();
                false
            }
            Taken::Already => true,
            Taken::Unknown => {
                return Err(Problem::new(
                    ProblemType::NotFound,
                    "no item with this message id is or was in the inbox",
                )
                .field("message_id"));
            }
        };
        Ok((
            StatusCode::OK,
            axum::Json(json!({ "message_id": id, "already": already })),
        )
            .into_response())
    })
    .await
}

/// `limit=N` (1..=1000), nothing else.
fn parse_limit(query: Option<&str>) -> Result<usize, Problem> {
    let bad = |detail: String| Problem::new(ProblemType::InvalidParameter, detail).field("limit");
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(DEFAULT_LIMIT);
    };
    let mut limit = DEFAULT_LIMIT;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "limit" {
            return Err(Problem::new(
                ProblemType::InvalidParameter,
                "the only query parameter is limit",
            )
            .field("limit"));
        }
        limit = value
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                ))
            })?;
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(parse_limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(parse_limit(Some("")).unwrap(), DEFAULT_LIMIT);
        assert_eq!(parse_limit(Some("limit=5")).unwrap(), 5);
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "limit=",
            "page=2",
            "limit=-1",
        ] {
            assert_eq!(
                parse_limit(Some(bad)).unwrap_err().kind(),
                Some(ProblemType::InvalidParameter),
                "{bad}"
            );
        }
    }
}
