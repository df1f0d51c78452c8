// Built instead of csrc/cuda/kernels.cu when pysteer is compiled without CUDA: device tensors are then
// edited through ggml_backend_tensor_get/set and the CPU kernels.
#include "kernels.h"

namespace pysteer::cuda {

struct DeviceState {};
DeviceState * create_state() { return nullptr; }
void destroy_state(DeviceState *) {}
void clear_directions(DeviceState *) {}
bool built() { return false; }
std::string apply(DeviceState *, const OpView &, float *, int64_t, int64_t, int64_t) {
    return "pysteer was built without CUDA kernels";
}

}  // namespace pysteer::cuda
