//! A JSONL file: one event per line, appended. A batch counts as delivered only after it is
//! written, flushed and (by default) fsynced, so a crash after `deliver` returned never loses
//! it. A crash mid-batch can leave a partial last line; the next run appends after it, and the
//! partial events are sent again from the checkpoint (at least once).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use super::{DeliverFuture, Sink, SinkError, write_jsonl};
use crate::transform::Event;

/// Appends JSON lines to a file.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: Option<File>,
    fsync: bool,
    buf: Vec<u8>,
}

impl FileSink {
    /// Opens (creating) `path` for appending. A file whose last line is incomplete (a crash
    /// mid-write) gets a newline first, so every complete event stays on its own line.
    pub fn open(path: PathBuf, fsync: bool) -> Result<Self, SinkError> {
        let io_err = |source| SinkError::Io {
            target: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).map_err(io_err)?;
            file.read_exact(&mut last).map_err(io_err)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(io_err)?;
            }
        }
        Ok(FileSink {
            path,
            file: Some(file),
            fsync,
            buf: Vec::new(),
        })
    }
}

impl Sink for FileSink {
    fn deliver<'a>(&'a mut self, events: &'a mut [Event]) -> DeliverFuture<'a> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(());
            }
            self.buf.clear();
            write_jsonl(events, &mut self.buf)?;
            let target = self.path.display().to_string();
            let mut file = self.file.take().ok_or_else(|| SinkError::Io {
                target: target.clone(),
                source: std::io::Error::other("file closed after an earlier failure"),
            })?;
            let buf = std::mem::take(&mut self.buf);
            let fsync = self.fsync;
            let (file, buf, result) = tokio::task::spawn_blocking(move || {
                let r = file
                    .write_all(&buf)
                    .and_then(|()| if fsync { file.sync_data() } else { Ok(()) });
                (file, buf, r)
            })
            .await
            .map_err(|e| SinkError::Io {
                target: target.clone(),
                source: std::io::Error::other(e),
            })?;
            self.file = Some(file);
            self.buf = buf;
            result.map_err(|source| SinkError::Io { target, source })
        })
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
}
