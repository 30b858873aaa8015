//! The sink: a batch's events not yet delivered, checked against `max_event_bytes`, packed into
//! requests up to `max_request_bytes`, sent one at a time in order; a 413 splits a request in
//! halves, a refused request's events become dead letters, and a failure that may pass ends
//! the attempt with the marks saying what got through.

use std::collections::{HashSet, VecDeque};

use super::config::HttpConfig;
use super::encoder::{self, Encoded};
use super::service::{Answer, Service};
use crate::sink::{Batch, Rejected, Sink, SinkError, SinkFuture};
use crate::transform::event::now_rfc3339;

/// Writes events to an HTTP endpoint (RudderStack's HTTP API or a webhook).
pub struct HttpSink {
    config: HttpConfig,
    service: Service,
    /// The events of the current attempt, encoded once.
    encoded: Encoded,
}

impl HttpSink {
    /// A sink for `config`: the client (and its connection pool) is made here; nothing
    /// connects until the first request.
    pub fn new(config: &HttpConfig) -> Result<Self, SinkError> {
        Ok(HttpSink {
            config: config.clone(),
            service: Service::new(config)?,
            encoded: Encoded::default(),
        })
    }

    fn reject(batch: &mut Batch<'_>, index: usize, reason: String) {
        if !batch.rejected.iter().any(|r| r.index == index) {
            batch.delivered[index] = false;
            batch.rejected.push(Rejected { index, reason });
        }
    }

    async fn attempt(&mut self, batch: &mut Batch<'_>) -> Result<(), SinkError> {
        let rejected: HashSet<usize> = batch.rejected.iter().map(|r| r.index).collect();
        let pending: Vec<bool> = (0..batch.events.len())
            .map(|i| !batch.delivered[i] && !rejected.contains(&i))
            .collect();
        encoder::encode(
            &self.config.format,
            batch.events,
            |i| pending[i],
            &mut self.encoded,
        );
        let mut send = Vec::new();
        for (i, _) in pending.iter().enumerate().filter(|(_, p)| **p) {
            let size = self.encoded.ranges[i].len();
            if size > self.config.max_event_bytes {
                let reason = format!(
                    "the event is {size} bytes, over the HTTP destination's max_event_bytes ({} bytes)",
                    self.config.max_event_bytes
                );
                tracing::warn!(reason = %reason, "an event is too large: it goes to the dead letters");
                Self::reject(batch, i, reason);
            } else {
                send.push(i);
            }
        }
        if send.is_empty() {
            return Ok(());
        }
        // The envelope's sentAt is the events' own (stamped for this attempt).
        let sent_at = batch.events[send[0]]
            .sent_at
            .as_deref()
            .map(str::to_owned)
            .unwrap_or_else(now_rfc3339);
        let envelope = encoder::envelope_len(&self.config.format, &sent_at);
        let mut requests: VecDeque<Vec<usize>> = encoder::pack(
            &self.encoded,
            &send,
            envelope,
            self.config.max_request_bytes,
        )
        .into();
        // One request at a time, in order: one user's events never overtake each other.
        while let Some(request) = requests.pop_front() {
            let body = encoder::body(&self.config.format, &self.encoded, &request, &sent_at);
            match self.service.post(body).await? {
                Answer::Accepted => {
                    for &i in &request {
                        batch.delivered[i] = true;
                    }
                }
                Answer::TooLarge { .. } if request.len() > 1 => {
                    tracing::info!(
                        events = request.len(),
                        "the endpoint answered 413 (too large): sending the request in two halves"
                    );
                    let (first, second) = request.split_at(request.len() / 2);
                    requests.push_front(second.to_vec());
                    requests.push_front(first.to_vec());
                }
                Answer::TooLarge { excerpt } => {
                    let i = request[0];
                    let reason = format!(
                        "HTTP 413: {excerpt} (the event alone, {} bytes, is too large for the endpoint)",
                        self.encoded.ranges[i].len()
                    );
                    tracing::warn!(reason = %reason, "the endpoint refused an event for good: it goes to the dead letters");
                    Self::reject(batch, i, reason);
                }
                Answer::Refused { status, excerpt } => {
                    let reason = format!("HTTP {status}: {excerpt}");
                    tracing::warn!(
                        reason = %reason,
                        events = request.len(),
                        "the endpoint refused a request for good: its events go to the dead letters"
                    );
                    for &i in &request {
                        Self::reject(batch, i, reason.clone());
                    }
                }
            }
        }
        Ok(())
    }
}

impl Sink for HttpSink {
    fn deliver<'a>(&'a mut self, batch: &'a mut Batch<'_>) -> SinkFuture<'a, ()> {
        Box::pin(self.attempt(batch))
    }

    fn healthcheck(&mut self) -> SinkFuture<'_, String> {
        Box::pin(self.service.probe())
    }

    fn shutdown(&mut self) -> SinkFuture<'_, ()> {
        // Nothing is held between batches: every request was answered before deliver returned.
        Box::pin(async { Ok(()) })
    }

    fn describe(&self) -> String {
        format!("http:{}", self.service.origin())
    }
}
