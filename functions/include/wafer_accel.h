/* wafer_accel.h: the accelerator imports of wafer's `wafer` module, for C guests
 * (clang --target=wasm32-wasi). The same calls as Rust's `wafer_guest::accel`.
 *
 * A function deployed with accel=1 (or a job of one) holds a device; every call of a
 * guest without one fails with WAFER_ACCEL_NOT_GRANTED. Handles (programs, kernels,
 * buffers) are small positive numbers valid only in this instance. Calls return a
 * handle, a size or 0 on success, and a negative WAFER_ACCEL_* code on failure; then
 * wafer_accel_error() copies the message (for a compile failure: the build log).
 * Every pointer and length is checked by the host: a range outside the guest's memory
 * fails with WAFER_ACCEL_INVALID.
 */
#ifndef WAFER_ACCEL_H
#define WAFER_ACCEL_H

#include <stddef.h>
#include <stdint.h>

#define WAFER_IMPORT(name) __attribute__((import_module("wafer"), import_name(name)))

enum {
    WAFER_ACCEL_COMPILE = -1,          /* did not compile; the message is the build log */
    WAFER_ACCEL_UNKNOWN_KERNEL = -2,   /* no kernel of that name */
    WAFER_ACCEL_ARG_COUNT = -3,        /* wrong number of arguments */
    WAFER_ACCEL_ARG_TYPE = -4,         /* an argument does not fit its parameter */
    WAFER_ACCEL_BUFFER_TOO_SMALL = -5, /* fewer elements than work-items */
    WAFER_ACCEL_WORK_SIZE = -6,        /* work sizes beyond the device's limits */
    WAFER_ACCEL_MEMORY_LIMIT = -7,     /* the grant's device memory is used up */
    WAFER_ACCEL_TIMEOUT = -8,          /* past the deadline */
    WAFER_ACCEL_BUSY = -9,             /* the device still runs a kernel past its deadline */
    WAFER_ACCEL_INVALID = -10,         /* unknown handle, range out of bounds ... */
    WAFER_ACCEL_DEVICE = -11,          /* the driver failed */
    WAFER_ACCEL_NOT_GRANTED = -12,     /* no accelerator granted */
    WAFER_ACCEL_UNAVAILABLE = -13,     /* the node's backend cannot be reached */
};

/* Kinds of wafer_accel_arg. */
enum {
    WAFER_ARG_BUFFER = 0, /* value: a buffer handle */
    WAFER_ARG_INT = 1,
    WAFER_ARG_UINT = 2,
    WAFER_ARG_LONG = 3,
    WAFER_ARG_ULONG = 4,
    WAFER_ARG_FLOAT = 5,  /* value: the float's bits */
    WAFER_ARG_DOUBLE = 6, /* value: the double's bits */
    WAFER_ARG_LOCAL = 7,  /* value: bytes of __local memory */
};

/* One kernel argument: 16 bytes, little-endian. */
typedef struct {
    uint32_t kind;
    uint32_t pad;
    uint64_t value;
} wafer_accel_arg;

/* Copies the last failure's message (at most cap bytes); returns its full length. */
int32_t wafer_accel_error(char *buf, size_t cap) WAFER_IMPORT("accel_error");
/* The granted device as JSON (at most cap bytes); returns its full length. */
int32_t wafer_accel_device(char *buf, size_t cap) WAFER_IMPORT("accel_device");
/* Compiles OpenCL C source (no #include) with options (-D, -cl-*, -w); a program handle. */
int32_t wafer_accel_compile(const char *src, size_t src_len, const char *opt, size_t opt_len)
    WAFER_IMPORT("accel_compile");
/* The kernel `name` of a program; a kernel handle. */
int32_t wafer_accel_kernel(uint32_t program, const char *name, size_t name_len)
    WAFER_IMPORT("accel_kernel");
/* A zero-filled buffer of `bytes` on the device; a buffer handle. */
int32_t wafer_accel_alloc(uint64_t bytes) WAFER_IMPORT("accel_alloc");
/* Copies len bytes at ptr into the buffer at offset. */
int32_t wafer_accel_write(uint32_t buffer, uint64_t offset, const void *ptr, size_t len)
    WAFER_IMPORT("accel_write");
/* Copies len bytes of the buffer from offset to ptr. */
int32_t wafer_accel_read(uint32_t buffer, uint64_t offset, void *ptr, size_t len)
    WAFER_IMPORT("accel_read");
/* Runs a kernel over global[dims] work-items in groups of local[dims] (NULL: the driver
 * chooses) and waits; returns the device time in ns. */
int64_t wafer_accel_run(uint32_t kernel, const wafer_accel_arg *args, size_t nargs,
                        const uint64_t *global, const uint64_t *local, size_t dims)
    WAFER_IMPORT("accel_run");
/* Queues a run like wafer_accel_run without waiting: queued runs go to the device
 * together, in order, with the next read, write, run, finish or release of an object
 * they use, which also returns their errors. Returns 0 or an error code. */
int32_t wafer_accel_enqueue(uint32_t kernel, const wafer_accel_arg *args, size_t nargs,
                            const uint64_t *global, const uint64_t *local, size_t dims)
    WAFER_IMPORT("accel_enqueue");
/* Sends the queued runs and waits for them; returns their device time in ns (from the
 * first one's start to the last one's end). */
int64_t wafer_accel_finish(void) WAFER_IMPORT("accel_finish");
/* Frees a program, kernel or buffer. */
int32_t wafer_accel_release(uint32_t handle) WAFER_IMPORT("accel_release");

#endif
