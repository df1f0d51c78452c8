// The few ggml functions the hook calls, as addresses taken at run time from the libggml that
// llama-cpp-python loaded: the extension links to no llama.cpp library, so it can never load a second copy.
#pragma once
#include <ggml.h>
#include <ggml-backend.h>

namespace pysteer {

struct GgmlApi {
    bool (*buffer_is_host)(ggml_backend_buffer_t) = nullptr;
    void (*tensor_get)(const ggml_tensor *, void *, size_t, size_t) = nullptr;
    void (*tensor_set)(ggml_tensor *, const void *, size_t, size_t) = nullptr;
};

}  // namespace pysteer
