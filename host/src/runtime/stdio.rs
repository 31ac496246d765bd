//! Guest stdio: a bounded log sink for stderr and `wafer.log` that drops what overflows
//! instead of failing the guest.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Debug, Default)]
struct LogState {
    buf: BytesMut,
    dropped: u64,
}

/// A log buffer holding at most `capacity` bytes; writes beyond it are counted and
/// dropped, so a chatty guest keeps running.
#[derive(Debug, Clone)]
pub struct LogPipe {
    capacity: usize,
    state: Arc<Mutex<LogState>>,
}

impl LogPipe {
    /// An empty log holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> LogPipe {
        LogPipe {
            capacity,
            state: Arc::new(Mutex::new(LogState::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A poisoned lock only means another writer panicked mid-append; the bytes are
        // still a valid log.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `bytes`, keeping what fits.
    pub fn append(&self, bytes: &[u8]) {
        let mut state = self.lock();
        let room = self.capacity.saturating_sub(state.buf.len());
        let keep = bytes.len().min(room);
        state.buf.extend_from_slice(&bytes[..keep]);
        state.dropped += (bytes.len() - keep) as u64;
    }

    /// The captured bytes and how many bytes were dropped.
    pub fn contents(&self) -> (Bytes, u64) {
        let state = self.lock();
        (state.buf.clone().freeze(), state.dropped)
    }
}

impl IsTerminal for LogPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for LogPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_fits_and_counts_the_rest() {
        let log = LogPipe::new(8);
        log.append(b"hello");
        log.append(b" world");
        let (bytes, dropped) = log.contents();
        assert_eq!(&bytes[..], b"hello wo");
        assert_eq!(dropped, 3);
    }
}
