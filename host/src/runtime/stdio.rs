//! Guest stdio: a bounded log sink for stderr and `wafer.log` that drops what overflows
//! instead of failing the guest, and the captured stdout (the response), which stops
//! the guest when it passes its limit.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

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

#[derive(Debug, Default)]
struct ResponseState {
    buf: BytesMut,
    overflowed: bool,
}

/// The guest's captured stdout: at most `limit` bytes. A write past the limit traps,
/// ending the guest at once: its response can no longer be sent, and a guest that
/// ignores write errors (an unchecked `printf` loop) would otherwise run on to its
/// timeout.
#[derive(Debug, Clone)]
pub struct ResponsePipe {
    limit: usize,
    state: Arc<Mutex<ResponseState>>,
}

impl ResponsePipe {
    /// An empty response of at most `limit` bytes.
    pub fn new(limit: usize) -> ResponsePipe {
        ResponsePipe {
            limit,
            state: Arc::new(Mutex::new(ResponseState::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ResponseState> {
        // A poisoned lock only means another writer panicked mid-append; the bytes
        // are still what the guest wrote.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `bytes` if they fit; otherwise marks the response overflowed.
    fn append(&self, bytes: &[u8]) -> Result<(), ResponseOverflow> {
        let mut state = self.lock();
        if state.overflowed || bytes.len() > self.limit - state.buf.len() {
            state.overflowed = true;
            return Err(ResponseOverflow { limit: self.limit });
        }
        state.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Whether the guest tried to write past the limit.
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Takes the bytes written (without a copy), leaving the pipe empty.
    pub fn take(&self) -> Bytes {
        std::mem::take(&mut self.lock().buf).freeze()
    }
}

/// A guest wrote more to stdout than its response limit.
#[derive(Debug, thiserror::Error)]
#[error("stdout passed the response limit of {limit} bytes")]
pub struct ResponseOverflow {
    limit: usize,
}

impl IsTerminal for ResponsePipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for ResponsePipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for ResponsePipe {
    async fn ready(&mut self) {}
}

impl OutputStream for ResponsePipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes)
            .map_err(|e| StreamError::Trap(wasmtime::Error::new(e)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always room: a write past the limit is refused in `write`, with a trap.
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for ResponsePipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(
            self.append(buf)
                .map(|()| buf.len())
                .map_err(io::Error::other),
        )
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

    #[test]
    fn a_response_takes_up_to_its_limit_and_refuses_past_it() {
        let out = ResponsePipe::new(8);
        assert!(out.append(b"hello").is_ok());
        assert!(out.append(b"abc").is_ok(), "exactly at the limit");
        assert!(!out.overflowed());
        assert!(out.append(b"!").is_err());
        assert!(out.overflowed());
        assert_eq!(&out.take()[..], b"helloabc");
    }
}
