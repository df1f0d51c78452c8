// Interventions on a block of activation rows: row r is x[r*stride .. r*stride + n_embd).
// The CPU versions (namespace cpu) edit host memory in place; the CUDA versions (namespace cuda, built with
// PYSTEER_CUDA) take a device pointer, run on the current device and synchronize before returning.
#pragma once
#include <cstdint>
#include <string>

namespace pysteer {

// save and ablate_delta are the two halves of an edit of one block's write into the residual stream, the
// attention or FFN output y = after - before: save keeps the rows of the residual before the block (its vector is
// not read), ablate_delta edits the residual after it: with one vector d = sqrt(w) r, ``y <- y - d (d.y)``; with
// three (a, b, s), ``y <- s * (y - a (b.y))`` (the row-norm-preserving edit). They run in the hook (host memory),
// not in these kernels.
enum class OpKind : int { Ablate = 0, Add = 1, Rotate = 2, Save = 3, AblateDelta = 4 };

// One intervention on one tensor. dirs holds k rows of n_embd floats: ablate: k orthonormal directions;
// add: one vector (alpha already applied); rotate: orthonormal b1, b2.
struct OpView {
    OpKind kind;
    int64_t k;
    const float * dirs;
    float cos_t;
    float sin_t;
    bool adaptive;
};

namespace cpu {
void apply(const OpView & op, float * x, int64_t n_rows, int64_t stride, int64_t n_embd);
}

namespace cuda {
// Device copies of op directions and a stream per device; owned by one Hook, freed with it.
struct DeviceState;
DeviceState * create_state();
void destroy_state(DeviceState * s);
void clear_directions(DeviceState * s);  // call when the ops (and so their host buffers) change

// Runs op on device memory x (on whichever device holds x) and synchronizes. "" on success, else the error.
std::string apply(DeviceState * s, const OpView & op, float * x, int64_t n_rows, int64_t stride, int64_t n_embd);
bool built();
}  // namespace cuda

}  // namespace pysteer
