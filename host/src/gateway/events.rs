//! `GET /v1/events`: the node's event stream ([`crate::events`]) as server-sent events,
//! with this node's invocation totals every [`STATS_EVERY`]: what the console follows.
//!
//! Each SSE event is named for its kind (`deployed`, `deleted`, `task_changed`,
//! `node_joined`, `node_lost`, `leader_changed`, `stats`, `missed`, `ended`) and carries
//! JSON. The caller's token is checked again every second: once revoked or expired,
//! the stream sends `ended` and closes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Extension;
use futures_util::Stream;
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::{interval, Interval, MissedTickBehavior};

use super::AppState;
use crate::events::Event;
use crate::state::{Scope, TokenRecord};

/// How often the stream carries this node's invocation totals.
pub const STATS_EVERY: Duration = Duration::from_secs(2);
/// How often the caller's token is checked again.
const TOKEN_RECHECK: Duration = Duration::from_secs(1);
/// A comment line this often keeps idle proxies from closing the stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One follower's position in the stream.
struct Follow {
    app: Arc<AppState>,
    token_hash: String,
    receiver: broadcast::Receiver<Arc<Event>>,
    stats: Interval,
    recheck: Interval,
    ended: bool,
}

/// `GET /v1/events` (read): events as they happen on this node.
pub async fn stream(
    State(app): State<Arc<AppState>>,
    Extension(record): Extension<Arc<TokenRecord>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut stats = interval(STATS_EVERY);
    stats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut recheck = interval(TOKEN_RECHECK);
    recheck.set_missed_tick_behavior(MissedTickBehavior::Delay);
    recheck.reset(); // the middleware has just checked it
    let follow = Follow {
        receiver: app.events.subscribe(),
        app,
        token_hash: record.hash.clone(),
        stats,
        recheck,
        ended: false,
    };
    Sse::new(futures_util::stream::unfold(follow, next))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

fn named(name: &str, data: &serde_json::Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

/// The next SSE event, or the end of the stream.
async fn next(mut follow: Follow) -> Option<(Result<SseEvent, Infallible>, Follow)> {
    if follow.ended {
        return None;
    }
    let event = loop {
        tokio::select! {
            received = follow.receiver.recv() => match received {
                Ok(event) => {
                    let data = serde_json::to_value(&*event).unwrap_or_default();
                    let name = data["type"].as_str().unwrap_or("event").to_string();
                    break named(&name, &data);
                }
                Err(RecvError::Lagged(missed)) => {
                    break named("missed", &json!({ "missed": missed }));
                }
                Err(RecvError::Closed) => return None,
            },
            _ = follow.stats.tick() => {
                let (invocations, errors) = follow.app.metrics.totals.get();
                break named("stats", &json!({
                    "at_ms": crate::scheduler::now_ms(),
                    "invocations": invocations,
                    "errors": errors,
                }));
            }
            _ = follow.recheck.tick() => {
                if let Err(e) = follow.app.tokens.authorize_hash(&follow.token_hash, Scope::Read) {
                    follow.ended = true;
                    break named("ended", &json!({ "reason": e.to_string() }));
                }
            }
        }
    };
    Some((Ok(event), follow))
}
