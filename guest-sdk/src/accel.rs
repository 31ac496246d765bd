//! Accelerators: OpenCL kernels on the device granted to this function or job.
//!
//! A function deployed with `accel=1` (or a job of one) holds a device of the node it
//! runs on; its calls here go to the host's `wafer` import module, which forwards them
//! to the node's accelerator backend. Buffers stay on the device between calls, so a
//! chain of kernels moves no data through the guest. A guest without a grant gets
//! [`ErrorKind::NotGranted`] from every call.
//!
//! ```no_run
//! use wafer_guest::accel::{self, Arg};
//!
//! fn add(a: &[f32], b: &[f32]) -> Result<Vec<f32>, accel::Error> {
//!     let program = accel::compile(
//!         "__kernel void add(__global const float* a, __global const float* b, __global float* c) {
//!              size_t i = get_global_id(0);
//!              c[i] = a[i] + b[i];
//!          }",
//!         "",
//!     )?;
//!     let kernel = program.kernel("add")?;
//!     let bytes = (a.len() * 4) as u64;
//!     let (da, db, dc) = (accel::alloc(bytes)?, accel::alloc(bytes)?, accel::alloc(bytes)?);
//!     da.write_f32(0, a)?;
//!     db.write_f32(0, b)?;
//!     kernel.run(&[Arg::Buffer(&da), Arg::Buffer(&db), Arg::Buffer(&dc)], &[a.len() as u64], None)?;
//!     dc.read_f32(0, a.len())
//! }
//! ```
//!
//! C guests call the same imports through `functions/include/wafer_accel.h`.

use std::fmt;

/// What kind of failure (the host's negative return codes, in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The program did not compile; the message is the build log.
    Compile,
    /// The program has no kernel of that name.
    UnknownKernel,
    /// More or fewer arguments than the kernel has parameters.
    ArgCount,
    /// An argument that does not fit its parameter.
    ArgType,
    /// A buffer argument holds fewer elements than there are work-items.
    BufferTooSmall,
    /// Work sizes beyond the device's limits.
    WorkSize,
    /// The grant's device memory is used up.
    MemoryLimit,
    /// The call ran past its deadline.
    Timeout,
    /// The device still runs a kernel that passed its deadline.
    Busy,
    /// Bad input: an unknown handle, a range outside a buffer or guest memory, ...
    Invalid,
    /// The device or its driver failed.
    Device,
    /// This function or job was not granted an accelerator.
    NotGranted,
    /// The node's accelerator backend cannot be reached.
    Unavailable,
}

const KINDS: [ErrorKind; 13] = [
    ErrorKind::Compile,
    ErrorKind::UnknownKernel,
    ErrorKind::ArgCount,
    ErrorKind::ArgType,
    ErrorKind::BufferTooSmall,
    ErrorKind::WorkSize,
    ErrorKind::MemoryLimit,
    ErrorKind::Timeout,
    ErrorKind::Busy,
    ErrorKind::Invalid,
    ErrorKind::Device,
    ErrorKind::NotGranted,
    ErrorKind::Unavailable,
];

impl ErrorKind {
    /// The kind of a negative code returned by an accelerator import (an unknown
    /// code is [`ErrorKind::Device`]).
    pub fn from_code(code: i64) -> ErrorKind {
        usize::try_from(-code - 1)
            .ok()
            .and_then(|i| KINDS.get(i).copied())
            .unwrap_or(ErrorKind::Device)
    }
}

/// A failed accelerator call: its kind and the host's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What kind.
    pub kind: ErrorKind,
    /// The host's message (the build log, for [`ErrorKind::Compile`]).
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(target_arch = "wasm32")]
mod host {
    #[link(wasm_import_module = "wafer")]
    extern "C" {
        pub fn accel_error(ptr: *mut u8, cap: usize) -> i32;
        pub fn accel_device(ptr: *mut u8, cap: usize) -> i32;
        pub fn accel_compile(src: *const u8, src_len: usize, opt: *const u8, opt_len: usize)
            -> i32;
        pub fn accel_kernel(program: u32, name: *const u8, name_len: usize) -> i32;
        pub fn accel_alloc(bytes: u64) -> i32;
        pub fn accel_write(buffer: u32, offset: u64, ptr: *const u8, len: usize) -> i32;
        pub fn accel_read(buffer: u32, offset: u64, ptr: *mut u8, len: usize) -> i32;
        pub fn accel_run(
            kernel: u32,
            args: *const u8,
            nargs: usize,
            global: *const u64,
            local: *const u64,
            dims: usize,
        ) -> i64;
        pub fn accel_enqueue(
            kernel: u32,
            args: *const u8,
            nargs: usize,
            global: *const u64,
            local: *const u64,
            dims: usize,
        ) -> i32;
        pub fn accel_finish() -> i64;
        pub fn accel_release(handle: u32) -> i32;
    }
}

/// Turns a host return value into a result, fetching the message of a failure.
fn check(code: i64) -> Result<i64, Error> {
    if code >= 0 {
        return Ok(code);
    }
    Err(Error {
        kind: ErrorKind::from_code(code),
        message: last_error(),
    })
}

#[cfg(target_arch = "wasm32")]
fn last_error() -> String {
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: the host writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { host::accel_error(buf.as_mut_ptr(), buf.len()) };
    buf.truncate(usize::try_from(n).unwrap_or(0).min(64 << 10));
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(not(target_arch = "wasm32"))]
fn last_error() -> String {
    "accelerators are reached through the wafer host (build for wasm32-wasip1)".into()
}

/// Outside WebAssembly there is no host: every call fails as not granted.
#[cfg(not(target_arch = "wasm32"))]
fn outside() -> i64 {
    -12
}

/// The granted device, as JSON (name, vendor, type, compute units, memory ...).
pub fn device() -> Result<String, Error> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut buf = vec![0u8; 4096];
        // SAFETY: the host writes at most `buf.len()` bytes into `buf`.
        let n = check(i64::from(unsafe {
            host::accel_device(buf.as_mut_ptr(), buf.len())
        }))?;
        buf.truncate((n as usize).min(buf.len()));
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        check(outside()).map(|_| String::new())
    }
}

/// An OpenCL program compiled on the device (cached by the backend: compiling the same
/// source again is cheap).
#[derive(Debug)]
pub struct Program(u32);

/// A kernel of a [`Program`].
#[derive(Debug)]
pub struct Kernel(u32);

/// Device memory; freed when dropped.
#[derive(Debug)]
pub struct Buffer {
    handle: u32,
    size: u64,
}

/// Compiles OpenCL C `source` with compiler `options` (`-D`, `-cl-*`, `-w`; no
/// `#include`). A failure carries the build log.
pub fn compile(source: &str, options: &str) -> Result<Program, Error> {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: pointers and lengths describe live byte slices the host only reads.
    let code = unsafe {
        host::accel_compile(
            source.as_ptr(),
            source.len(),
            options.as_ptr(),
            options.len(),
        )
    };
    #[cfg(not(target_arch = "wasm32"))]
    let code = {
        let _ = (source, options);
        outside() as i32
    };
    Ok(Program(check(i64::from(code))? as u32))
}

/// A zero-filled buffer of `bytes` bytes on the device, counted against the grant's
/// device memory ([`ErrorKind::MemoryLimit`] past it).
pub fn alloc(bytes: u64) -> Result<Buffer, Error> {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: no pointers.
    let code = unsafe { host::accel_alloc(bytes) };
    #[cfg(not(target_arch = "wasm32"))]
    let code = outside() as i32;
    Ok(Buffer {
        handle: check(i64::from(code))? as u32,
        size: bytes,
    })
}

impl Program {
    /// The kernel `name`.
    pub fn kernel(&self, name: &str) -> Result<Kernel, Error> {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: the pointer and length describe `name`, which the host only reads.
        let code = unsafe { host::accel_kernel(self.0, name.as_ptr(), name.len()) };
        #[cfg(not(target_arch = "wasm32"))]
        let code = {
            let _ = name;
            outside() as i32
        };
        Ok(Kernel(check(i64::from(code))? as u32))
    }
}

/// One kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    /// A `__global` or `__constant` pointer parameter.
    Buffer(&'a Buffer),
    /// `int` (also `char`, `short`, `bool` when the value fits).
    Int(i32),
    /// `uint` (also `uchar`, `ushort` when the value fits).
    Uint(u32),
    /// `long`.
    Long(i64),
    /// `ulong` (and `size_t` on 64-bit devices).
    Ulong(u64),
    /// `float`.
    Float(f32),
    /// `double`.
    Double(f64),
    /// A `__local` pointer parameter: bytes of local memory.
    Local(u64),
}

impl Arg<'_> {
    /// The 16-byte record the host reads: kind (u32), padding, value (u64), little-endian.
    fn record(&self) -> [u8; 16] {
        let (kind, bits): (u32, u64) = match *self {
            Arg::Buffer(b) => (0, u64::from(b.handle)),
            Arg::Int(v) => (1, u64::from(v as u32)),
            Arg::Uint(v) => (2, u64::from(v)),
            Arg::Long(v) => (3, v as u64),
            Arg::Ulong(v) => (4, v),
            Arg::Float(v) => (5, u64::from(v.to_bits())),
            Arg::Double(v) => (6, v.to_bits()),
            Arg::Local(v) => (7, v),
        };
        let mut record = [0u8; 16];
        record[..4].copy_from_slice(&kind.to_le_bytes());
        record[8..].copy_from_slice(&bits.to_le_bytes());
        record
    }
}

/// How a run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunInfo {
    /// Time the kernel ran on the device, ns.
    pub device_ns: u64,
}

impl Kernel {
    /// Runs the kernel over `global` work-items (1 to 3 dimensions) in work-groups of
    /// `local` (`None`: the driver chooses), and waits for it (after any runs queued
    /// with [`enqueue`](Self::enqueue), whose errors it answers too). Arguments are
    /// checked against the kernel's parameters first: count, kinds, buffer sizes (one
    /// element per work-item at least) and work sizes each fail with their own kind.
    pub fn run(
        &self,
        args: &[Arg<'_>],
        global: &[u64],
        local: Option<&[u64]>,
    ) -> Result<RunInfo, Error> {
        Ok(RunInfo {
            device_ns: self.submit(args, global, local, false)? as u64,
        })
    }

    /// Queues a run like [`run`](Self::run) without waiting for it. Queued runs go to
    /// the device together, in order, with the next call that must come after them (a
    /// buffer read or write, a `run`, [`finish`], or dropping an object they use), so a
    /// chain of kernels costs one round trip to the backend instead of one per kernel.
    /// Their errors (with `run I of N: ` before the message) are answered by that call;
    /// when one fails its checks, none of the runs sent with it runs. Runs that no later
    /// call sends never run.
    ///
    /// ```no_run
    /// # use wafer_guest::accel::{self, Arg};
    /// # fn main() -> Result<(), accel::Error> {
    /// let program = accel::compile("__kernel void inc(__global int* x) { x[get_global_id(0)] += 1; }", "")?;
    /// let inc = program.kernel("inc")?;
    /// let x = accel::alloc(4 * 1024)?;
    /// for _ in 0..100 {
    ///     inc.enqueue(&[Arg::Buffer(&x)], &[1024], None)?;
    /// }
    /// let mut out = [0u8; 4];
    /// x.read(0, &mut out)?; // sends the 100 runs, then reads: 100
    /// # Ok(())
    /// # }
    /// ```
    pub fn enqueue(
        &self,
        args: &[Arg<'_>],
        global: &[u64],
        local: Option<&[u64]>,
    ) -> Result<(), Error> {
        self.submit(args, global, local, true).map(|_| ())
    }

    fn submit(
        &self,
        args: &[Arg<'_>],
        global: &[u64],
        local: Option<&[u64]>,
        queued: bool,
    ) -> Result<i64, Error> {
        let records: Vec<u8> = args.iter().flat_map(|a| a.record()).collect();
        if let Some(local) = local {
            if local.len() != global.len() {
                return Err(Error {
                    kind: ErrorKind::WorkSize,
                    message: format!(
                        "local sizes have as many dimensions as global ones ({}), not {}",
                        global.len(),
                        local.len()
                    ),
                });
            }
        }
        #[cfg(target_arch = "wasm32")]
        let code = {
            let local = local.map_or(std::ptr::null(), |l| l.as_ptr());
            // SAFETY: every pointer and length describes a live slice the host only reads.
            unsafe {
                if queued {
                    i64::from(host::accel_enqueue(
                        self.0,
                        records.as_ptr(),
                        args.len(),
                        global.as_ptr(),
                        local,
                        global.len(),
                    ))
                } else {
                    host::accel_run(
                        self.0,
                        records.as_ptr(),
                        args.len(),
                        global.as_ptr(),
                        local,
                        global.len(),
                    )
                }
            }
        };
        #[cfg(not(target_arch = "wasm32"))]
        let code = {
            let _ = (records, local, queued);
            outside()
        };
        check(code)
    }
}

/// Sends the runs queued with [`Kernel::enqueue`] and waits for them. Answers their
/// device time, from the first one's start to the last one's end (0 when none was
/// queued); a run that failed is answered as its error.
pub fn finish() -> Result<RunInfo, Error> {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: no pointers.
    let code = unsafe { host::accel_finish() };
    #[cfg(not(target_arch = "wasm32"))]
    let code = outside();
    Ok(RunInfo {
        device_ns: check(code)? as u64,
    })
}

impl Buffer {
    /// Its size, bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Copies `data` into the buffer at byte `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: the pointer and length describe `data`, which the host only reads.
        let code = unsafe { host::accel_write(self.handle, offset, data.as_ptr(), data.len()) };
        #[cfg(not(target_arch = "wasm32"))]
        let code = {
            let _ = (offset, data);
            outside() as i32
        };
        check(i64::from(code)).map(|_| ())
    }

    /// Copies bytes from byte `offset` of the buffer into `out` (all of it).
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: the pointer and length describe `out`, which the host writes at most
        // `out.len()` bytes into.
        let code = unsafe { host::accel_read(self.handle, offset, out.as_mut_ptr(), out.len()) };
        #[cfg(not(target_arch = "wasm32"))]
        let code = {
            let _ = (offset, out);
            outside() as i32
        };
        check(i64::from(code)).map(|_| ())
    }

    /// Writes floats (little-endian) at element `index`.
    pub fn write_f32(&self, index: u64, data: &[f32]) -> Result<(), Error> {
        let bytes: Vec<u8> = data.iter().flat_map(|f| f.to_le_bytes()).collect();
        self.write(index * 4, &bytes)
    }

    /// Reads `count` floats from element `index`.
    pub fn read_f32(&self, index: u64, count: usize) -> Result<Vec<f32>, Error> {
        let mut bytes = vec![0u8; count * 4];
        self.read(index * 4, &mut bytes)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

fn release(handle: u32) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: no pointers.
    unsafe {
        host::accel_release(handle);
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = handle;
}

impl Drop for Program {
    fn drop(&mut self) {
        release(self.0);
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        release(self.0);
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        release(self.handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        assert_eq!(ErrorKind::from_code(-1), ErrorKind::Compile);
        assert_eq!(ErrorKind::from_code(-12), ErrorKind::NotGranted);
        assert_eq!(ErrorKind::from_code(-13), ErrorKind::Unavailable);
        assert_eq!(ErrorKind::from_code(-99), ErrorKind::Device);
        let err = compile("__kernel void k() {}", "").err();
        assert_eq!(err.map(|e| e.kind), Some(ErrorKind::NotGranted));
    }

    #[test]
    fn arg_records() {
        let r = Arg::Float(1.5).record();
        assert_eq!(u32::from_le_bytes([r[0], r[1], r[2], r[3]]), 5);
        assert_eq!(&r[8..12], &1.5f32.to_bits().to_le_bytes());
        let r = Arg::Int(-1).record();
        assert_eq!(&r[8..16], &[255, 255, 255, 255, 0, 0, 0, 0]);
    }
}
