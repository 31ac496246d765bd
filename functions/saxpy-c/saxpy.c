/* saxpy-c: y = a*x + y on the granted accelerator, from C through wafer_accel.h.
 * Query: n (elements, 1-16777216; 1024) and a (the factor; 2). Answers the checksum of
 * y computed on the device and on the CPU, or the accelerator's error. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wafer_accel.h"

static const char *SOURCE =
    "__kernel void saxpy(__global const float* x, __global float* y, float a) {\n"
    "    size_t i = get_global_id(0);\n"
    "    y[i] = a * x[i] + y[i];\n"
    "}\n";

static long query_number(const char *name, long fallback) {
    const char *query = getenv("QUERY_STRING");
    size_t len = strlen(name);
    while (query && *query) {
        if (strncmp(query, name, len) == 0 && query[len] == '=') {
            return strtol(query + len + 1, NULL, 10);
        }
        query = strchr(query, '&');
        if (query) query++;
    }
    return fallback;
}

static int fail(const char *what, int code) {
    char message[4096];
    int n = wafer_accel_error(message, sizeof message - 1);
    message[n < (int)sizeof message - 1 ? n : (int)sizeof message - 1] = 0;
    printf("Status: 500\nContent-Type: text/plain\n\n%s failed (%d): %s\n", what, code, message);
    return 0;
}

int main(void) {
    long n = query_number("n", 1024);
    float a = (float)query_number("a", 2);
    if (n < 1 || n > (1 << 24)) {
        printf("Status: 400\nContent-Type: text/plain\n\nn is 1 to 16777216\n");
        return 0;
    }
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    double expected = 0;
    for (long i = 0; i < n; i++) {
        x[i] = (float)(i % 100);
        y[i] = 1.0f;
        expected += (double)(a * x[i] + y[i]);
    }
    int32_t program = wafer_accel_compile(SOURCE, strlen(SOURCE), "", 0);
    if (program < 0) return fail("compile", program);
    int32_t kernel = wafer_accel_kernel(program, "saxpy", 5);
    if (kernel < 0) return fail("kernel", kernel);
    uint64_t bytes = (uint64_t)n * sizeof(float);
    int32_t dx = wafer_accel_alloc(bytes), dy = wafer_accel_alloc(bytes);
    if (dx < 0) return fail("alloc", dx);
    if (dy < 0) return fail("alloc", dy);
    int32_t rc = wafer_accel_write(dx, 0, x, bytes);
    if (rc < 0) return fail("write", rc);
    rc = wafer_accel_write(dy, 0, y, bytes);
    if (rc < 0) return fail("write", rc);
    uint32_t a_bits;
    memcpy(&a_bits, &a, sizeof a_bits);
    wafer_accel_arg args[3] = {
        {WAFER_ARG_BUFFER, 0, (uint64_t)dx},
        {WAFER_ARG_BUFFER, 0, (uint64_t)dy},
        {WAFER_ARG_FLOAT, 0, a_bits},
    };
    uint64_t global[1] = {(uint64_t)n};
    int64_t ns = wafer_accel_run(kernel, args, 3, global, NULL, 1);
    if (ns < 0) return fail("run", (int)ns);
    rc = wafer_accel_read(dy, 0, y, bytes);
    if (rc < 0) return fail("read", rc);
    double got = 0;
    for (long i = 0; i < n; i++) got += (double)y[i];
    printf("Content-Type: text/plain\n\nn=%ld device=%.1f cpu=%.1f %s (%lld ns)\n", n, got, expected,
           got == expected ? "match" : "MISMATCH", (long long)ns);
    return 0;
}
