__kernel void saxpy(__global const float* x, __global float* y, float a) {
    size_t i = get_global_id(0);
    y[i] = a * x[i] + y[i];
}
__kernel void matmul(__global const float* a, __global const float* b,
                     __global float* c, uint n) {
    uint row = get_global_id(1);
    uint col = get_global_id(0);
    float sum = 0.0f;
    for (uint k = 0; k < n; k++) {
        sum += a[row * n + k] * b[k * n + col];
    }
    c[row * n + col] = sum;
}
__kernel void tiny(__global float* x) {
    x[get_global_id(0)] += 1.0f;
}
