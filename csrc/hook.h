// One Hook per llama_context: the state behind cb_eval. Python fills a plan between decodes; during a
// decode the callback reads the plan and writes captured rows, touching no Python object and never throwing.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "ggml_api.h"

namespace pysteer {

// One watched tensor name (e.g. "l_out-3"); a name can fill several capture slots ("pre" of 4 is "post" of 3).
struct Watch {
    std::vector<int64_t> slot_offsets;  // element offset of each (point, layer) block inside one sample
    bool marker = false;                // the embedding output: first watched node of every ubatch
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

class Hook {
  public:
    Hook(const GgmlApi & api, int64_t n_embd);

    void set_watches(const std::vector<std::string> & names, const std::vector<std::vector<int64_t>> & slots,
                     const std::string & marker);
    void begin_decode(DecodePlan plan);
    // Ends the decode; returns the first error recorded in the callback ("" if none) and clears it.
    std::string end_decode();
    bool capturing() const { return plan_.out != nullptr; }

    static bool eval_callback(ggml_tensor * t, bool ask, void * user_data);
    static bool abort_callback(void * user_data);

  private:
    bool on_eval(ggml_tensor * t, const Watch & w);
    void fail(std::string msg);
    void capture(ggml_tensor * t, const Watch & w);

    GgmlApi api_;
    int64_t n_embd_;
    std::vector<std::string> names_;                       // owns the keys of watches_
    std::unordered_map<std::string_view, Watch> watches_;
    DecodePlan plan_;
    int64_t ubatch_ = -1;       // index of the ubatch being computed
    int64_t u0_ = 0, u1_ = 0;   // its batch-token range
    int64_t o0_ = 0, o1_ = 0;   // its range in plan_.outputs
    int64_t c0_ = 0, c1_ = 0;   // its range in plan_.cap_tok
    std::vector<float> scratch_;
    std::string error_;
};

}  // namespace pysteer
