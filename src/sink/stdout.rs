//! Standard output: one JSON event per line, flushed before the batch counts as delivered.
//! Durability is whatever the reader of the pipe makes of it.

use std::io::Write;

use super::{DeliverFuture, Sink, SinkError, write_jsonl};
use crate::transform::Event;

/// Writes JSON lines to stdout.
#[derive(Debug, Default)]
pub struct StdoutSink {
    buf: Vec<u8>,
}

impl StdoutSink {
    /// A new stdout sink.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Sink for StdoutSink {
    fn deliver<'a>(&'a mut self, events: &'a mut [Event]) -> DeliverFuture<'a> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(());
            }
            self.buf.clear();
            write_jsonl(events, &mut self.buf)?;
            let buf = std::mem::take(&mut self.buf);
            let buf = tokio::task::spawn_blocking(move || {
                let mut out = std::io::stdout().lock();
                out.write_all(&buf).and_then(|()| out.flush()).map(|()| buf)
            })
            .await
            .map_err(|e| SinkError::Io {
                target: "stdout".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| SinkError::Io {
                target: "stdout".into(),
                source,
            })?;
            self.buf = buf;
            Ok(())
        })
    }

    fn describe(&self) -> String {
        "stdout".into()
    }
}
