#include <cmath>
#include <vector>

#include "kernels.h"

namespace pysteer::cpu {
namespace {

// Dot products accumulate in double: |h·r| after ablation is then limited by float storage of h, not by
// the order of a 1e3-term float sum.
inline double dot(const float * a, const float * b, int64_t n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
    return s;
}

inline void axpy(float * y, float a, const float * x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

void apply(const OpView & op, float * x, int64_t n_rows, int64_t stride, int64_t n_embd) {
    switch (op.kind) {
        case OpKind::Ablate: {
            std::vector<double> c(static_cast<size_t>(op.k));
            for (int64_t r = 0; r < n_rows; ++r) {
                float * h = x + r * stride;
                for (int64_t j = 0; j < op.k; ++j) c[j] = dot(h, op.dirs + j * n_embd, n_embd);
                for (int64_t j = 0; j < op.k; ++j) axpy(h, static_cast<float>(-c[j]), op.dirs + j * n_embd, n_embd);
            }
            break;
        }
        case OpKind::Add:
            for (int64_t r = 0; r < n_rows; ++r) axpy(x + r * stride, 1.0f, op.dirs, n_embd);
            break;
        case OpKind::Rotate: {
            const float * b1 = op.dirs;
            const float * b2 = op.dirs + n_embd;
            for (int64_t r = 0; r < n_rows; ++r) {
                float * h = x + r * stride;
                const double x1 = dot(h, b1, n_embd);
                if (op.adaptive && !(x1 > 0.0)) continue;
                const double x2 = dot(h, b2, n_embd);
                const double n = std::sqrt(x1 * x1 + x2 * x2);
                axpy(h, static_cast<float>(n * op.cos_t - x1), b1, n_embd);
                axpy(h, static_cast<float>(n * op.sin_t - x2), b2, n_embd);
            }
            break;
        }
    }
}

}  // namespace pysteer::cpu
