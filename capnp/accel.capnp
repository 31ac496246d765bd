# An accelerator backend (`wafer accel`): OpenCL devices served as capabilities. A
# kernel behaves like an actor that receives buffers and answers with buffers.
#
# The backend's port is reached through the cluster-secret `Door` of node.capnp
# (`Door.accel(secret)`), so only members of the cluster reach a device.
#
# Every object below is a capability: a client can use only the sessions, programs,
# kernels and buffers it was handed, and dropping the last reference to a session frees
# everything it allocated. Calls pipeline: a client may compile, look up a kernel, run
# it and read its output without waiting between the steps (see `Kernel.run`).
#
# Errors: a failed call raises an exception whose description starts with
# `wafer.accel.KIND: ` where KIND is one of the names of `ErrorKind` below, followed by
# a message for people (for `compile`, the compiler's build log). Calls pipelined on a
# failed call fail with the same exception.
@0xe9c9321a97e69f26;

interface Accel {
  # Every device this backend serves, in a stable order (the index is `Device.index`).
  devices @0 () -> (devices :List(Device));

  # Opens a session on device `device`: the unit of a grant. `memoryLimit` bounds the
  # bytes of all its buffers together (0: the backend's default, never more than its
  # maximum); `timeoutMs` bounds each kernel run (0: the backend's default). Sessions
  # never see each other's buffers.
  open @1 (device :UInt32, memoryLimit :UInt64, timeoutMs :UInt64) -> (session :Session);
}

# One OpenCL device.
struct Device {
  # Position in `Accel.devices()`; what `Accel.open` names.
  index @0 :UInt32;
  # The device's name (`CL_DEVICE_NAME`).
  name @1 :Text;
  # The device's vendor (`CL_DEVICE_VENDOR`).
  vendor @2 :Text;
  # CPU, GPU or other accelerator.
  type @3 :DeviceType;
  # Parallel compute units (`CL_DEVICE_MAX_COMPUTE_UNITS`).
  computeUnits @4 :UInt32;
  # Global memory, bytes (`CL_DEVICE_GLOBAL_MEM_SIZE`).
  globalMemory @5 :UInt64;
  # Most work-items in one work-group (`CL_DEVICE_MAX_WORK_GROUP_SIZE`).
  maxWorkGroupSize @6 :UInt64;
  # Most work-items per dimension of a work-group (`CL_DEVICE_MAX_WORK_ITEM_SIZES`).
  maxWorkItemSizes @7 :List(UInt64);
  # The OpenCL platform (driver) that serves it, e.g. "Portable Computing Language".
  platform @8 :Text;
  # Largest single buffer, bytes (`CL_DEVICE_MAX_MEM_ALLOC_SIZE`).
  maxAlloc @9 :UInt64;
  # Sessions open on it now.
  sessions @10 :UInt32;
  # Bytes held by buffers on it now.
  allocated @11 :UInt64;
  # A kernel that ran past its deadline still occupies the device; runs are refused
  # (`busy`) until it ends.
  busy @12 :Bool;
}

enum DeviceType {
  cpu @0;
  gpu @1;
  accelerator @2;
  other @3;
}

# A grant's view of one device: its programs and buffers.
interface Session {
  # Compiles OpenCL C `source` with the compiler `options` (e.g. "-cl-fast-relaxed-math").
  # Programs are cached by the digest of source and options: compiling the same text
  # again costs no compiler run. Fails with `compile` and the build log.
  compile @0 (source :Text, options :Text) -> (program :Program);

  # A buffer of `bytes` bytes of device memory, zero-filled. Fails with `memoryLimit`
  # when the session's buffers would exceed its limit, `invalid` for 0 bytes or more
  # than the device's largest allocation.
  alloc @1 (bytes :UInt64) -> (buffer :Buffer);

  # Bytes held by this session's buffers, and its limit.
  usage @2 () -> (allocated :UInt64, limit :UInt64);

  # The device this session runs on.
  device @3 () -> (device :Device);

  # Runs `runs` one after another on the device, in order, in one call: a chain of
  # kernels costs one round trip instead of one per kernel. Each run is checked as in
  # `Kernel.run` before any is started; when one fails its checks, none runs and the
  # call fails with that run's kind, the message starting `run I of N: `. The call waits
  # for the last run; the session's deadline bounds the whole call (past it, `timeout`,
  # and the device is `busy` until the runs already enqueued end).
  # At most 4096 runs per call (`invalid`). `info.deviceNs` is the device time from the
  # first run's start to the last run's end (only those two are timed, so the runs in
  # between cost no profiling).
  runAll @4 (runs :List(Run)) -> (info :RunInfo);
}

# One run of `Session.runAll`: the parameters of `Kernel.run` and the kernel.
struct Run {
  # A kernel of the same session.
  kernel @0 :Kernel;
  args @1 :List(Arg);
  global @2 :List(UInt64);
  local @3 :List(UInt64);
}

interface Program {
  # The kernel called `name`. Fails with `unknownKernel` when the program has none.
  kernel @0 (name :Text) -> (kernel :Kernel);

  # The compiler's output for this program (warnings; empty when there were none).
  buildLog @1 () -> (log :Text);
}

interface Kernel {
  # Runs the kernel over `global` work-items (1 to 3 dimensions) in work-groups of
  # `local` (empty: the driver chooses) with `args`, one per kernel parameter, and waits
  # for it to finish. Checked first, each failing with its own kind: the number of
  # arguments (`argCount`), each argument's kind against the parameter (`argType`), each
  # global buffer holding at least one element per work-item (`bufferTooSmall`), and the
  # work sizes against the device (`workSize`). A run past the session's deadline fails
  # with `timeout`.
  #
  # `done` reaches the arguments after the run: a call on it pipelines behind the run,
  # so `run(...).done.buffer(i).read(...)` reads the output in the same round trip.
  run @0 (args :List(Arg), global :List(UInt64), local :List(UInt64)) -> (info :RunInfo, done :Done);

  # The kernel's parameters as the compiler declared them.
  params @1 () -> (params :List(Param));
}

# One kernel argument.
struct Arg {
  union {
    # A `__global` or `__constant` pointer parameter: a buffer of the same session.
    buffer @0 :Buffer;
    int @1 :Int32;
    uint @2 :UInt32;
    long @3 :Int64;
    ulong @4 :UInt64;
    float @5 :Float32;
    double @6 :Float64;
    # A `__local` pointer parameter: bytes of work-group local memory.
    local @7 :UInt64;
  }
}

# A kernel parameter.
struct Param {
  # Its name in the source.
  name @0 :Text;
  # Its type as written, e.g. "float*" or "uint".
  typeName @1 :Text;
  # Where a pointer points.
  addressSpace @2 :AddressSpace;
}

enum AddressSpace {
  private @0;  # a value (scalar or vector), not a pointer
  global @1;
  constant @2;
  local @3;
}

# How a run went.
struct RunInfo {
  # Time the kernel ran on the device, ns (OpenCL profiling: start to end).
  deviceNs @0 :UInt64;
  # Time from the call's arrival at the backend to the kernel's end, ns (includes
  # waiting for the device).
  totalNs @1 :UInt64;
}

# The arguments of a finished run.
interface Done {
  # The buffer passed as argument `index`. Fails with `invalid` when that argument is
  # not a buffer.
  buffer @0 (index :UInt32) -> (buffer :Buffer);
}

# Device memory that stays on the device between calls.
interface Buffer {
  # Copies `data` into the buffer at byte `offset`.
  write @0 (offset :UInt64, data :Data);
  # Copies `length` bytes from byte `offset` out of the buffer.
  read @1 (offset :UInt64, length :UInt64) -> (data :Data);
  # The buffer's size, bytes.
  size @2 () -> (bytes :UInt64);
}

# The KIND of an error (see the top of this file).
enum ErrorKind {
  # The program did not compile; the message is the build log.
  compile @0;
  # The program has no kernel of that name.
  unknownKernel @1;
  # `run` got more or fewer arguments than the kernel has parameters.
  argCount @2;
  # An argument's kind does not fit its parameter (a number for a pointer, ...).
  argType @3;
  # A buffer argument holds fewer elements than there are work-items.
  bufferTooSmall @4;
  # Work sizes beyond the device's limits, or local sizes that do not divide global ones.
  workSize @5;
  # The session's buffers would exceed its memory limit.
  memoryLimit @6;
  # The kernel ran past the session's deadline.
  timeout @7;
  # The device still runs a kernel that passed its deadline.
  busy @8;
  # A read or write outside a buffer, a buffer of another backend or session, an
  # unknown device, a size of 0 ...
  invalid @9;
  # The OpenCL driver failed.
  device @10;
}
