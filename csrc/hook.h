// One Hook per llama_context: the state behind cb_eval. Python sets interventions and capture plans between
// decodes; during a decode the callback reads them, edits rows in place and copies captured rows out,
// touching no Python object and never throwing.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "ggml_api.h"
#include "kernels.h"

namespace pysteer {

struct Op {
    OpKind kind;
    int64_t k;
    std::vector<float> dirs;  // k * n_embd
    float cos_t = 1.0f, sin_t = 0.0f;
    bool adaptive = false;
    int64_t slot = -1;  // save / ablate_delta: which saved rows

    OpView view() const { return {kind, k, dirs.data(), cos_t, sin_t, adaptive}; }
};

// What happens at one tensor name (e.g. "l_out-3"): interventions in order, then the capture copies.
struct Watch {
    std::vector<size_t> ops;             // indices into Hook::ops_
    std::vector<int64_t> slot_offsets;   // capture: element offset of each (point, layer) block in one sample
    bool marker = false;                 // capture: the embedding output, first watched node of every ubatch
    bool stop = false;                   // capture: the last captured node; the rest of the graph is skipped
};

// Where the rows of one decode go. Token indices are positions in the llama_batch; with a unified KV cache
// llama.cpp splits a batch into ubatches of n_ubatch consecutive tokens (split_simple).
struct DecodePlan {
    int64_t n_tokens = 0;
    int64_t n_ubatch = 0;
    std::vector<int64_t> outputs;   // sorted batch indices of tokens flagged as outputs (last-layer rows)
    std::vector<int64_t> cap_tok;   // sorted batch indices of captured tokens
    std::vector<int64_t> cap_dst;   // element offset in `out` of each captured token's slot-0 row
    float * out = nullptr;
};

// How edits reach device memory: CUDA kernels in place, or tensor_get -> CPU kernel -> tensor_set.
enum class DevicePath : int { Copy = 0, Cuda = 1 };

struct CudaStateDeleter {
    void operator()(cuda::DeviceState * s) const { cuda::destroy_state(s); }
};

class Hook {
  public:
    Hook(const GgmlApi & api, int64_t n_embd);

    // Interventions (between decodes only): replaces all ops at once (one rebuild of the watch table).
    // row_marker: the first residual tensor of every ubatch, watched when ops need the ubatch's rows
    // (ablate_delta on the last layer, whose rows llama.cpp prunes to the outputs); "" when none do.
    void set_ops(std::vector<std::pair<std::string, Op>> ops, std::string row_marker = "");
    size_t n_ops() const { return ops_.size(); }
    void set_device_path(DevicePath p) { device_path_ = p; }

    // Capture (between decodes only). stop_after: a captured name after which every decode computes nothing
    // more until clear_capture ("" = the whole graph); its logits and later layers' KV cells are then garbage.
    void set_capture(const std::vector<std::string> & names, const std::vector<std::vector<int64_t>> & slots,
                     const std::string & marker, const std::string & stop_after = "");
    void clear_capture();
    void begin_decode(DecodePlan plan);
    bool capturing() const { return plan_.out != nullptr; }
    bool tracking() const { return plan_.n_tokens > 0; }  // begin_decode gave this decode's rows

    // Ends a decode; returns the first error recorded in the callback ("" if none) and clears it.
    std::string end_decode();
    int64_t n_edited_rows() const { return n_edited_rows_; }
    int64_t n_empty_calls() const { return n_empty_calls_; }  // edited tensors that arrived with 0 rows
    // Data callbacks (each one ends a graph split) and the time spent inside them, for benchmarks.
    int64_t n_data_calls() const { return n_data_calls_; }
    double callback_seconds() const { return callback_ns_ * 1e-9; }

    static bool eval_callback(ggml_tensor * t, bool ask, void * user_data);
    static bool abort_callback(void * user_data);

  private:
    void rebuild();
    void on_eval(ggml_tensor * t, const Watch & w);
    void apply_ops(ggml_tensor * t, const Watch & w);
    void apply_host(const Op & op, const char * name, float * x, int64_t n_rows, int64_t stride);
    void capture(ggml_tensor * t, const Watch & w);
    void fail(std::string msg);

    GgmlApi api_;
    int64_t n_embd_;
    std::vector<std::pair<std::string, Op>> ops_;
    std::vector<std::string> cap_names_;
    std::vector<std::vector<int64_t>> cap_slots_;
    std::string marker_;
    std::string stop_after_;
    std::string row_marker_;
    bool host_ops_ = false;                   // some op runs in the hook itself (save / ablate_delta)
    std::vector<std::vector<float>> saved_;  // save: the rows of the last ubatch, by slot
    std::unordered_map<std::string, Watch> watches_;  // names fit std::string's small buffer: no allocation
    DevicePath device_path_ = DevicePath::Copy;
    std::unique_ptr<cuda::DeviceState, CudaStateDeleter> cuda_;

    DecodePlan plan_;
    int64_t ubatch_ = -1;       // index of the ubatch being computed
    int64_t u0_ = 0, u1_ = 0;   // its batch-token range
    int64_t o0_ = 0, o1_ = 0;   // its range in plan_.outputs
    int64_t c0_ = 0, c1_ = 0;   // its range in plan_.cap_tok
    int64_t n_edited_rows_ = 0;
    int64_t n_empty_calls_ = 0;
    int64_t n_data_calls_ = 0;
    int64_t callback_ns_ = 0;
    std::vector<float> scratch_;
    std::string error_;
};

}  // namespace pysteer
