//! Read queries: a [`ReadQuery`] checked and turned into what a backend
//! runs (time window, filters, the key to continue after, rows to fetch),
//! and the opaque page cursors.
//!
//! A cursor is the hex of a small JSON object naming the endpoint and the
//! sort key of the last row returned. Pages are keyset-paginated on that
//! sort key, which is unique per device (it ends with the row's identity),
//! so a cursor stays valid and meaningful however many rows are inserted
//! meanwhile. Cursors are not secret and not signed: a client that forges
//! one only changes where its own page starts.

use serde::{Deserialize, Serialize};
use sync_protocol::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, ReadQuery};

/// Why a read query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `limit` is 0 or above [`MAX_PAGE_LIMIT`].
    #[error("limit {limit} is out of range 1..={MAX_PAGE_LIMIT}")]
    LimitOutOfRange {
        /// The value given.
        limit: u32,
    },
    /// `from_ms` is not before `to_ms`.
    #[error("from_ms {from_ms} must be less than to_ms {to_ms}")]
    EmptyRange {
        /// The value given.
        from_ms: i64,
        /// The value given.
        to_ms: i64,
    },
    /// A filter this endpoint does not have.
    #[error("filter {filter} does not apply to {endpoint}")]
    FilterNotApplicable {
        /// The query parameter.
        filter: &'static str,
        /// The endpoint's last path segment.
        endpoint: &'static str,
    },
    /// `cursor` is not a `next_cursor` of this endpoint.
    #[error("cursor is not a next_cursor of {endpoint}")]
    BadCursor {
        /// The endpoint's last path segment.
        endpoint: &'static str,
    },
}

/// The sort key of the last row of a page, as carried in a cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", deny_unknown_fields)]
pub(super) enum CursorKey {
    /// Readings: `(recv_ts_ms, source, stream, seq)`.
    #[serde(rename = "r")]
    Reading {
        t: i64,
        src: String,
        st: String,
        s: i64,
    },
    /// Predictions: `(created_ms, model, seq)`.
    #[serde(rename = "p")]
    Prediction { t: i64, m: String, s: i64 },
    /// Dead letters: `(recv_ts_ms, seq)`.
    #[serde(rename = "d")]
    DeadLetter { t: i64, s: i64 },
    /// Heartbeats: `(received_ms, id)`.
    #[serde(rename = "h")]
    Heartbeat { t: i64, id: i64 },
    /// Fleet summary: the device id.
    #[serde(rename = "f")]
    Device { id: String },
}

impl CursorKey {
    pub(super) fn encode(&self) -> String {
        // Serialising this enum of integers and strings cannot fail.
        hex::encode(serde_json::to_vec(self).unwrap_or_default())
    }

    fn decode(text: &str, endpoint: &'static str) -> Result<CursorKey, QueryError> {
        hex::decode(text)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(QueryError::BadCursor { endpoint })
    }
}

/// Time window and page size shared by every read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Window {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Rows in a page; backends fetch one more to know whether a next page exists.
    pub limit: usize,
}

impl Window {
    /// Rows a backend fetches: `limit + 1`.
    pub(super) fn fetch(&self) -> i64 {
        i64::try_from(self.limit)
            .unwrap_or(i64::MAX)
            .saturating_add(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ReadingsQuery {
    pub window: Window,
    pub source: Option<String>,
    pub stream: Option<String>,
    pub after: Option<(i64, String, String, i64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PredictionsQuery {
    pub window: Window,
    pub source: Option<String>,
    pub stream: Option<String>,
    pub model: Option<String>,
    pub after: Option<(i64, String, i64)>,
}

/// Dead letters and heartbeats: a time window and a `(time, id)` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SeriesQuery {
    pub window: Window,
    pub after: Option<(i64, i64)>,
}

fn window(query: &ReadQuery) -> Result<Window, QueryError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
        return Err(QueryError::LimitOutOfRange { limit });
    }
    if let (Some(from_ms), Some(to_ms)) = (query.from_ms, query.to_ms)
        && from_ms >= to_ms
    {
        return Err(QueryError::EmptyRange { from_ms, to_ms });
    }
    Ok(Window {
        from_ms: query.from_ms,
        to_ms: query.to_ms,
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
    })
}

fn refuse(
    endpoint: &'static str,
    filters: &[(&'static str, &Option<String>)],
) -> Result<(), QueryError> {
    match filters.iter().find(|(_, value)| value.is_some()) {
        Some((filter, _)) => Err(QueryError::FilterNotApplicable { filter, endpoint }),
        None => Ok(()),
    }
}

fn cursor(query: &ReadQuery, endpoint: &'static str) -> Result<Option<CursorKey>, QueryError> {
    query
        .cursor
        .as_deref()
        .map(|text| CursorKey::decode(text, endpoint))
        .transpose()
}

impl ReadingsQuery {
    pub(super) fn new(query: &ReadQuery) -> Result<Self, QueryError> {
        const ENDPOINT: &str = "readings";
        refuse(ENDPOINT, &[("model", &query.model)])?;
        let after = match cursor(query, ENDPOINT)? {
            None => None,
            Some(CursorKey::Reading { t, src, st, s }) => Some((t, src, st, s)),
            Some(_) => return Err(QueryError::BadCursor { endpoint: ENDPOINT }),
        };
        Ok(ReadingsQuery {
            window: window(query)?,
            source: query.source.clone(),
            stream: query.stream.clone(),
            after,
        })
    }
}

impl PredictionsQuery {
    pub(super) fn new(query: &ReadQuery) -> Result<Self, QueryError> {
        const ENDPOINT: &str = "predictions";
        let after = match cursor(query, ENDPOINT)? {
            None => None,
            Some(CursorKey::Prediction { t, m, s }) => Some((t, m, s)),
            Some(_) => return Err(QueryError::BadCursor { endpoint: ENDPOINT }),
        };
        Ok(PredictionsQuery {
            window: window(query)?,
            source: query.source.clone(),
            stream: query.stream.clone(),
            model: query.model.clone(),
            after,
        })
    }
}

impl SeriesQuery {
    pub(super) fn dead_letters(query: &ReadQuery) -> Result<Self, QueryError> {
        const ENDPOINT: &str = "dead-letters";
        Self::new(query, ENDPOINT, |key| match key {
            CursorKey::DeadLetter { t, s } => Some((t, s)),
            _ => None,
        })
    }

    pub(super) fn heartbeats(query: &ReadQuery) -> Result<Self, QueryError> {
        const ENDPOINT: &str = "heartbeats";
        Self::new(query, ENDPOINT, |key| match key {
            CursorKey::Heartbeat { t, id } => Some((t, id)),
            _ => None,
        })
    }

    fn new(
        query: &ReadQuery,
        endpoint: &'static str,
        key: impl FnOnce(CursorKey) -> Option<(i64, i64)>,
    ) -> Result<Self, QueryError> {
        refuse(
            endpoint,
            &[
                ("source", &query.source),
                ("stream", &query.stream),
                ("model", &query.model),
            ],
        )?;
        let after = match cursor(query, endpoint)? {
            None => None,
            Some(cursor) => Some(key(cursor).ok_or(QueryError::BadCursor { endpoint })?),
        };
        Ok(SeriesQuery {
            window: window(query)?,
            after,
        })
    }
}

/// The fleet summary: a page size and the device id to continue after
/// (`""` sorts before every id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FleetQuery {
    pub window: Window,
    pub after: String,
}

impl FleetQuery {
    pub(super) fn new(query: &ReadQuery) -> Result<Self, QueryError> {
        const ENDPOINT: &str = "fleet";
        refuse(
            ENDPOINT,
            &[
                ("source", &query.source),
                ("stream", &query.stream),
                ("model", &query.model),
            ],
        )?;
        for (filter, value) in [("from_ms", query.from_ms), ("to_ms", query.to_ms)] {
            if value.is_some() {
                return Err(QueryError::FilterNotApplicable {
                    filter,
                    endpoint: ENDPOINT,
                });
            }
        }
        let after = match cursor(query, ENDPOINT)? {
            None => String::new(),
            Some(CursorKey::Device { id }) => id,
            Some(_) => return Err(QueryError::BadCursor { endpoint: ENDPOINT }),
        };
        Ok(FleetQuery {
            window: window(query)?,
            after,
        })
    }
}

/// Cuts `rows` (fetched with [`Window::fetch`]) to the page size and
/// returns the cursor of the last row kept when more rows exist.
pub(super) fn page<T>(
    mut rows: Vec<T>,
    window: &Window,
    key: impl Fn(&T) -> CursorKey,
) -> (Vec<T>, Option<String>) {
    if rows.len() <= window.limit {
        return (rows, None);
    }
    rows.truncate(window.limit);
    let next = rows.last().map(|row| key(row).encode());
    (rows, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_are_endpoint_specific() {
        let key = CursorKey::Reading {
            t: -5,
            src: "m\"1".into(),
            st: "t/x".into(),
            s: 9,
        };
        let text = key.encode();
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
        let query = ReadQuery {
            cursor: Some(text),
            ..ReadQuery::default()
        };
        assert_eq!(
            ReadingsQuery::new(&query).map(|q| q.after),
            Ok(Some((-5, "m\"1".into(), "t/x".into(), 9)))
        );
        assert_eq!(
            PredictionsQuery::new(&query).map(|q| q.after),
            Err(QueryError::BadCursor {
                endpoint: "predictions"
            })
        );
        for bad in ["", "zz", "7b7d", &hex::encode(br#"{"k":"r","t":1}"#)] {
            let query = ReadQuery {
                cursor: Some(bad.to_owned()),
                ..ReadQuery::default()
            };
            assert_eq!(
                ReadingsQuery::new(&query).map(|q| q.after),
                Err(QueryError::BadCursor {
                    endpoint: "readings"
                }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn limits_ranges_and_filters_are_checked() {
        let q = |edit: fn(&mut ReadQuery)| {
            let mut query = ReadQuery::default();
            edit(&mut query);
            query
        };
        assert_eq!(
            ReadingsQuery::new(&q(|_| {})).map(|q| q.window.limit),
            Ok(100)
        );
        assert_eq!(
            ReadingsQuery::new(&q(|q| q.limit = Some(0))),
            Err(QueryError::LimitOutOfRange { limit: 0 })
        );
        assert_eq!(
            ReadingsQuery::new(&q(|q| q.limit = Some(1001))),
            Err(QueryError::LimitOutOfRange { limit: 1001 })
        );
        assert_eq!(
            ReadingsQuery::new(&q(|q| {
                q.from_ms = Some(5);
                q.to_ms = Some(5);
            })),
            Err(QueryError::EmptyRange {
                from_ms: 5,
                to_ms: 5
            })
        );
        assert_eq!(
            ReadingsQuery::new(&q(|q| q.model = Some("m".into()))),
            Err(QueryError::FilterNotApplicable {
                filter: "model",
                endpoint: "readings"
            })
        );
        assert_eq!(
            SeriesQuery::heartbeats(&q(|q| q.stream = Some("s".into()))),
            Err(QueryError::FilterNotApplicable {
                filter: "stream",
                endpoint: "heartbeats"
            })
        );
    }
}
