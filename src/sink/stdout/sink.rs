//! Standard output: one JSON event per line, flushed before the batch counts as delivered.
//! Durability is whatever the reader of the pipe makes of it.
//!
//! What went out cannot be taken back (unlike the file sink, which cuts a failed write off): a
//! write that fails inside a line (a full disk behind a redirect, a file-size limit) has sent
//! the first bytes of that line. The rest of that line is kept and written first when the next
//! batch (the failed one, sent again from the checkpoint) goes out, so the consumer only ever
//! sees whole lines: the cut event complete, then the resent batch (at least once).

use std::io::{ErrorKind, Write};

use crate::sink::{Batch, Sink, SinkError, SinkFuture, json};

/// Writes JSON lines to stdout.
#[derive(Debug, Default)]
pub struct StdoutSink {
    buf: Vec<u8>,
    /// The rest of a line whose first bytes went out before a write failed.
    unfinished: Vec<u8>,
}

impl StdoutSink {
    /// A new stdout sink.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Sink for StdoutSink {
    fn deliver<'a>(&'a mut self, batch: &'a mut Batch<'_>) -> SinkFuture<'a, ()> {
        Box::pin(async move {
            if batch.is_done() {
                return Ok(());
            }
            self.buf.clear();
            json::write_lines(batch.events, &mut self.buf);
            let buf = std::mem::take(&mut self.buf);
            let mut unfinished = std::mem::take(&mut self.unfinished);
            let (buf, unfinished, result) = tokio::task::spawn_blocking(move || {
                let mut out = std::io::stdout().lock();
                let r = write_lines(&mut out, &mut unfinished, &buf);
                (buf, unfinished, r)
            })
            .await
            .map_err(|e| SinkError::Io {
                target: "stdout".into(),
                source: std::io::Error::other(e),
            })?;
            self.buf = buf;
            self.unfinished = unfinished;
            result.map_err(|source| SinkError::Io {
                target: "stdout".into(),
                source,
            })?;
            batch.mark_all_delivered();
            Ok(())
        })
    }

    fn healthcheck(&mut self) -> SinkFuture<'_, String> {
        Box::pin(async { Ok("events go to standard output".to_owned()) })
    }

    fn shutdown(&mut self) -> SinkFuture<'_, ()> {
        // Each batch was flushed as it was delivered.
        Box::pin(async { Ok(()) })
    }

    fn describe(&self) -> String {
        "stdout".into()
    }
}

/// Writes `bytes` to `out`; returns how many `out` accepted, and the error that stopped it.
fn write_counted(out: &mut impl Write, bytes: &[u8]) -> (usize, std::io::Result<()>) {
    let mut written = 0;
    while written < bytes.len() {
        match out.write(&bytes[written..]) {
            Ok(0) => {
                let e = std::io::Error::new(ErrorKind::WriteZero, "stdout accepted no bytes");
                return (written, Err(e));
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (written, Err(e)),
        }
    }
    (written, Ok(()))
}

/// Writes `batch` (whole lines) to `out` and flushes, after the rest of a line an earlier call
/// left `unfinished`. On failure inside a line, the rest of that line is left in `unfinished`
/// for the next call.
fn write_lines(
    out: &mut impl Write,
    unfinished: &mut Vec<u8>,
    batch: &[u8],
) -> std::io::Result<()> {
    if !unfinished.is_empty() {
        let (n, r) = write_counted(out, unfinished);
        unfinished.drain(..n);
        r?;
    }
    let (n, r) = write_counted(out, batch);
    if let Err(e) = r {
        if n > 0 && batch[n - 1] != b'\n' {
            let end = batch[n..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(batch.len(), |i| n + i + 1);
            unfinished.extend_from_slice(&batch[n..end]);
        }
        return Err(e);
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination that takes `room` more bytes (as a file-size limit does: a partial write,
    /// then an error), and everything once `room` is `None`.
    struct Limited {
        out: Vec<u8>,
        room: Option<usize>,
    }

    impl Write for Limited {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = match self.room {
                None => buf.len(),
                Some(0) => return Err(std::io::Error::other("File too large")),
                Some(room) => room.min(buf.len()),
            };
            if let Some(room) = &mut self.room {
                *room -= n;
            }
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(out: &[u8]) -> Vec<&str> {
        std::str::from_utf8(out)
            .expect("utf-8")
            .split_inclusive('\n')
            .collect()
    }

    #[test]
    fn a_retried_batch_follows_whole_lines_only() {
        let mut w = Limited {
            out: Vec::new(),
            room: Some(10),
        };
        let mut unfinished = Vec::new();
        let batch = b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n";
        assert!(write_lines(&mut w, &mut unfinished, batch).is_err());
        assert_eq!(w.out, b"{\"a\":1}\n{\"");
        // Still failing: nothing more goes out, nothing is lost.
        assert!(write_lines(&mut w, &mut unfinished, batch).is_err());
        // The destination recovers; the batch is sent again.
        w.room = None;
        write_lines(&mut w, &mut unfinished, batch).expect("write");
        assert!(unfinished.is_empty());
        assert_eq!(
            lines(&w.out),
            [
                "{\"a\":1}\n",
                "{\"b\":2}\n",
                "{\"a\":1}\n",
                "{\"b\":2}\n",
                "{\"c\":3}\n"
            ]
        );
    }

    #[test]
    fn a_failure_while_finishing_the_cut_line_keeps_its_rest() {
        let mut w = Limited {
            out: Vec::new(),
            room: Some(3),
        };
        let mut unfinished = Vec::new();
        assert!(write_lines(&mut w, &mut unfinished, b"abcdef\nxyz\n").is_err());
        w.room = Some(2);
        assert!(write_lines(&mut w, &mut unfinished, b"abcdef\nxyz\n").is_err());
        assert_eq!(w.out, b"abcde");
        w.room = None;
        write_lines(&mut w, &mut unfinished, b"abcdef\nxyz\n").expect("write");
        assert_eq!(lines(&w.out), ["abcdef\n", "abcdef\n", "xyz\n"]);
    }

    #[test]
    fn a_failure_at_a_line_end_leaves_nothing_to_finish() {
        let mut w = Limited {
            out: Vec::new(),
            room: Some(7),
        };
        let mut unfinished = Vec::new();
        assert!(write_lines(&mut w, &mut unfinished, b"abcdef\nxyz\n").is_err());
        assert!(unfinished.is_empty());
        w.room = None;
        write_lines(&mut w, &mut unfinished, b"xyz\n").expect("write");
        assert_eq!(lines(&w.out), ["abcdef\n", "xyz\n"]);
    }
}
