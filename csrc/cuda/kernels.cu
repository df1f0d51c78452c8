// CUDA versions of the interventions in kernels_cpu.cpp: one block per activation row, dot products
// reduced in double in shared memory, then the row updated in place. Run on a pysteer stream on the device
// that holds the tensor and synchronized before returning: ggml's own streams are non-blocking and private.
#include <cuda_runtime.h>

#include <map>
#include <string>
#include <utility>

#include "../kernels.h"

namespace pysteer::cuda {

struct DeviceState {
    std::map<std::pair<const float *, int>, float *> dirs;  // (host dirs, device) -> device copy
    std::map<int, cudaStream_t> streams;
};

DeviceState * create_state() { return new DeviceState(); }

void clear_directions(DeviceState * s) {
    if (!s) return;
    for (auto & kv : s->dirs) cudaFree(kv.second);
    s->dirs.clear();
}

void destroy_state(DeviceState * s) {
    if (!s) return;
    clear_directions(s);
    for (auto & kv : s->streams) cudaStreamDestroy(kv.second);
    delete s;
}

bool built() { return true; }

namespace {

constexpr int kThreads = 256;
constexpr int kMaxK = 16;  // directions per Ablate handled in one pass

__device__ double block_sum(double v, double * shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    double s = 0.0;
    if (threadIdx.x < 32) {
        s = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (threadIdx.x == 0) shared[0] = s;
    }
    __syncthreads();
    return shared[0];
}

__device__ double row_dot(const float * h, const float * d, int64_t n, double * shared) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<double>(h[i]) * d[i];
    return block_sum(s, shared);
}

__global__ void ablate_kernel(float * x, int64_t stride, int64_t n, const float * dirs, int64_t k) {
    __shared__ double shared[32];
    __shared__ float coef[kMaxK];
    float * h = x + blockIdx.x * stride;
    for (int64_t j = 0; j < k; ++j) {
        const double c = row_dot(h, dirs + j * n, n, shared);
        if (threadIdx.x == 0) coef[j] = static_cast<float>(c);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        float v = h[i];
        for (int64_t j = 0; j < k; ++j) v -= coef[j] * dirs[j * n + i];
        h[i] = v;
    }
}

__global__ void add_kernel(float * x, int64_t stride, int64_t n, const float * v) {
    float * h = x + blockIdx.x * stride;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) h[i] += v[i];
}

__global__ void rotate_kernel(float * x, int64_t stride, int64_t n, const float * b, float cos_t, float sin_t,
                              bool adaptive) {
    __shared__ double shared[32];
    float * h = x + blockIdx.x * stride;
    const double x1 = row_dot(h, b, n, shared);
    if (adaptive && !(x1 > 0.0)) return;
    const double x2 = row_dot(h, b + n, n, shared);
    const double r = sqrt(x1 * x1 + x2 * x2);
    const float a1 = static_cast<float>(r * cos_t - x1), a2 = static_cast<float>(r * sin_t - x2);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) h[i] += a1 * b[i] + a2 * b[n + i];
}

std::string check(cudaError_t e) { return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e)); }

}  // namespace

std::string apply(DeviceState * s, const OpView & op, float * x, int64_t n_rows, int64_t stride, int64_t n_embd) {
    if (n_rows <= 0) return "";  // a grid of 0 blocks is a launch error: nothing to edit, nothing to launch
    if (op.kind == OpKind::Ablate && op.k > kMaxK) return "at most 16 ablation directions per tensor on CUDA";
    cudaPointerAttributes attr{};
    if (auto e = check(cudaPointerGetAttributes(&attr, x)); !e.empty()) return e;
    if (attr.type != cudaMemoryTypeDevice) return "tensor data is not device memory";
    if (auto e = check(cudaSetDevice(attr.device)); !e.empty()) return e;

    cudaStream_t & stream = s->streams[attr.device];
    if (!stream) {
        if (auto e = check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); !e.empty()) return e;
    }
    float *& dirs = s->dirs[{op.dirs, attr.device}];
    if (!dirs) {
        const size_t bytes = sizeof(float) * static_cast<size_t>(op.k * n_embd);
        if (auto e = check(cudaMalloc(&dirs, bytes)); !e.empty()) return e;
        if (auto e = check(cudaMemcpyAsync(dirs, op.dirs, bytes, cudaMemcpyHostToDevice, stream)); !e.empty())
            return e;
    }
    const dim3 grid(static_cast<unsigned>(n_rows)), block(kThreads);
    switch (op.kind) {
        case OpKind::Ablate: ablate_kernel<<<grid, block, 0, stream>>>(x, stride, n_embd, dirs, op.k); break;
        case OpKind::Add: add_kernel<<<grid, block, 0, stream>>>(x, stride, n_embd, dirs); break;
        case OpKind::Rotate:
            rotate_kernel<<<grid, block, 0, stream>>>(x, stride, n_embd, dirs, op.cos_t, op.sin_t, op.adaptive);
            break;
        default: return "op kind has no CUDA kernel (the hook runs it on the host)";
    }
    if (auto e = check(cudaGetLastError()); !e.empty()) return e;
    return check(cudaStreamSynchronize(stream));
}

}  // namespace pysteer::cuda
