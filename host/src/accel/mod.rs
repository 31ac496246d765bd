//! Accelerators: `wafer accel`, a backend that owns OpenCL devices (`opencl.rs`) and
//! serves them as Cap'n Proto capabilities (`capnp/accel.capnp`, `backend.rs`), and the
//! host's side (`client.rs`), which forwards a granted guest's calls to a backend.

pub mod backend;
pub mod client;
pub mod opencl;

pub use opencl::{DeviceInfoSummary, DeviceType};

/// The agent attribute that names the type of its best device (`gpu` before
/// `accelerator` before `cpu`); a function's `accel_type` becomes a constraint on it.
pub const ACCEL_TYPE_ATTRIBUTE: &str = "accel.type";

/// The kinds of failure of `capnp/accel.capnp` (its `ErrorKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The program did not compile (the message is the build log).
    Compile,
    /// No kernel of that name.
    UnknownKernel,
    /// Wrong number of arguments.
    ArgCount,
    /// An argument that does not fit its parameter.
    ArgType,
    /// A buffer holds fewer elements than there are work-items.
    BufferTooSmall,
    /// Work sizes beyond the device's limits.
    WorkSize,
    /// The session's memory limit.
    MemoryLimit,
    /// A run past its deadline.
    Timeout,
    /// The device still runs a kernel past its deadline.
    Busy,
    /// Bad input: out of bounds, unknown device, foreign buffer ...
    Invalid,
    /// The OpenCL driver failed.
    Device,
    /// No accelerator was granted to the caller (host side only).
    NotGranted,
    /// The backend cannot be reached (host side only).
    Unavailable,
}

const KINDS: [(ErrorKind, &str); 13] = [
    (ErrorKind::Compile, "compile"),
    (ErrorKind::UnknownKernel, "unknownKernel"),
    (ErrorKind::ArgCount, "argCount"),
    (ErrorKind::ArgType, "argType"),
    (ErrorKind::BufferTooSmall, "bufferTooSmall"),
    (ErrorKind::WorkSize, "workSize"),
    (ErrorKind::MemoryLimit, "memoryLimit"),
    (ErrorKind::Timeout, "timeout"),
    (ErrorKind::Busy, "busy"),
    (ErrorKind::Invalid, "invalid"),
    (ErrorKind::Device, "device"),
    (ErrorKind::NotGranted, "notGranted"),
    (ErrorKind::Unavailable, "unavailable"),
];

/// Marks an accelerator error in a Cap'n Proto exception's description.
const PREFIX: &str = "wafer.accel.";

impl ErrorKind {
    /// The name in `accel.capnp`.
    pub fn name(self) -> &'static str {
        KINDS
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("device", |(_, n)| n)
    }

    /// The code a guest import returns for this kind (negative; see `wafer_guest::accel`).
    pub fn code(self) -> i32 {
        -(KINDS.iter().position(|(k, _)| *k == self).unwrap_or(10) as i32 + 1)
    }
}

/// An accelerator call's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", kind.name())]
pub struct AccelError {
    /// What kind.
    pub kind: ErrorKind,
    /// For people (a build log, for `Compile`).
    pub message: String,
}

impl AccelError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> AccelError {
        AccelError {
            kind,
            message: message.into(),
        }
    }

    /// The same error with `context: ` before its message (e.g. "run 2 of 3").
    pub fn prefixed(self, context: &str) -> AccelError {
        AccelError {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
        }
    }

    /// The Cap'n Proto exception that carries it.
    pub fn to_capnp(&self) -> capnp::Error {
        capnp::Error::failed(format!("{PREFIX}{}: {}", self.kind.name(), self.message))
    }

    /// Reads an error back from a failed call: the kind from the exception's
    /// description, `Unavailable` when the connection is gone, `Device` otherwise.
    pub fn from_capnp(e: &capnp::Error) -> AccelError {
        if matches!(
            e.kind,
            capnp::ErrorKind::Disconnected | capnp::ErrorKind::Overloaded
        ) {
            return AccelError::new(
                ErrorKind::Unavailable,
                format!("the accelerator backend is unreachable: {e}"),
            );
        }
        let text = e.extra.as_str();
        if let Some(at) = text.find(PREFIX) {
            let rest = &text[at + PREFIX.len()..];
            if let Some((name, message)) = rest.split_once(": ") {
                if let Some((kind, _)) = KINDS.iter().find(|(_, n)| *n == name) {
                    return AccelError::new(*kind, message);
                }
            }
        }
        AccelError::new(ErrorKind::Device, text)
    }
}

impl From<capnp::Error> for AccelError {
    fn from(e: capnp::Error) -> AccelError {
        AccelError::from_capnp(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        for (kind, _) in KINDS {
            let e = AccelError::new(kind, "line one\nline: two");
            let mut wire = e.to_capnp();
            wire.extra = format!("remote exception: {}", wire.extra);
            assert_eq!(AccelError::from_capnp(&wire), e);
            assert!(kind.code() < 0);
        }
        let gone = capnp::Error::disconnected("EOF".into());
        assert_eq!(AccelError::from_capnp(&gone).kind, ErrorKind::Unavailable);
    }

    #[test]
    fn guests_read_every_code_as_the_same_kind() {
        for (kind, _) in KINDS {
            let guest = wafer_guest::accel::ErrorKind::from_code(i64::from(kind.code()));
            assert_eq!(
                format!("{guest:?}"),
                format!("{kind:?}"),
                "code {}",
                kind.code()
            );
        }
    }
}
