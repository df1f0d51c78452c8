#include "hook.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <exception>

namespace pysteer {

Hook::Hook(const GgmlApi & api, int64_t n_embd) : api_(api), n_embd_(n_embd), cuda_(cuda::create_state()) {}

void Hook::set_ops(std::vector<std::pair<std::string, Op>> ops, std::string row_marker) {
    cuda::clear_directions(cuda_.get());  // device copies are keyed by host address
    ops_ = std::move(ops);
    row_marker_ = std::move(row_marker);
    host_ops_ = false;
    int64_t n_slots = 0;
    for (const auto & [name, op] : ops_) {
        if (op.kind == OpKind::Save || op.kind == OpKind::AblateDelta) {
            host_ops_ = true;
            n_slots = std::max(n_slots, op.slot + 1);
        }
    }
    saved_.assign(static_cast<size_t>(n_slots), {});
    rebuild();
}

void Hook::set_capture(const std::vector<std::string> & names, const std::vector<std::vector<int64_t>> & slots,
                       const std::string & marker, const std::string & stop_after) {
    cap_names_ = names;
    cap_slots_ = slots;
    marker_ = marker;
    stop_after_ = stop_after;
    rebuild();
}

void Hook::clear_capture() {
    cap_names_.clear();
    cap_slots_.clear();
    marker_.clear();
    stop_after_.clear();
    rebuild();
}

void Hook::rebuild() {
    watches_.clear();
    for (size_t i = 0; i < ops_.size(); ++i) watches_[ops_[i].first].ops.push_back(i);
    for (size_t i = 0; i < cap_names_.size(); ++i) watches_[cap_names_[i]].slot_offsets = cap_slots_[i];
    if (!marker_.empty()) watches_[marker_].marker = true;
    if (!stop_after_.empty()) watches_[stop_after_].stop = true;
    if (!row_marker_.empty()) watches_[row_marker_].marker = true;
}

void Hook::begin_decode(DecodePlan plan) {
    plan_ = std::move(plan);
    ubatch_ = -1;
    u0_ = u1_ = o0_ = o1_ = c0_ = c1_ = 0;
    error_.clear();
}

std::string Hook::end_decode() {
    std::string err;
    err.swap(error_);
    plan_ = DecodePlan{};
    return err;
}

void Hook::fail(std::string msg) {
    if (error_.empty()) error_ = std::move(msg);
}

bool Hook::abort_callback(void * user_data) {
    return !static_cast<Hook *>(user_data)->error_.empty();
}

bool Hook::eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * self = static_cast<Hook *>(user_data);
    if (self->watches_.empty()) return false;
    auto it = self->watches_.find(std::string(t->name));
    if (it == self->watches_.end()) return false;
    // Unselected graph branches carry no COMPUTE flag; only F32 rows of width n_embd are activations.
    if (!(t->flags & GGML_TENSOR_FLAG_COMPUTE) || t->type != GGML_TYPE_F32) return false;
    const Watch & w = it->second;
    // Capture-only names matter only while capturing: generation watches just the edited tensors (and the
    // first tensor of each ubatch when an op needs to know its rows).
    if (w.ops.empty() && !self->capturing() && !w.stop && !(w.marker && self->tracking() && !self->row_marker_.empty()))
        return false;
    if (ask) return true;
    const auto t0 = std::chrono::steady_clock::now();
    ++self->n_data_calls_;
    try {
        self->on_eval(t, w);
    } catch (const std::exception & e) {
        self->fail(std::string("pysteer hook: ") + e.what());
    } catch (...) {
        self->fail("pysteer hook: unknown C++ exception");
    }
    self->callback_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now() - t0).count();
    // Returning false ends the graph split being computed (on CPU the whole ubatch graph) but not llama_decode,
    // which goes on to the next ubatch: a capture (and the prefix decoded for it) needs nothing past its last
    // node. Errors abort instead.
    return !(w.stop && self->error_.empty());
}

void Hook::on_eval(ggml_tensor * t, const Watch & w) {
    if (!error_.empty()) return;
    if (t->ne[0] != n_embd_ || t->ne[2] != 1 || t->ne[3] != 1 || t->nb[0] != sizeof(float) ||
        t->nb[1] % sizeof(float) != 0) {
        fail(std::string("tensor ") + t->name + " is not a [n_embd, n_tokens] F32 activation");
        return;
    }
    if (tracking() && w.marker) {
        ++ubatch_;
        u0_ = ubatch_ * plan_.n_ubatch;
        u1_ = std::min(u0_ + plan_.n_ubatch, plan_.n_tokens);
        if (t->ne[1] != u1_ - u0_) {
            fail("ubatch " + std::to_string(ubatch_) + " has " + std::to_string(t->ne[1]) + " rows, expected " +
                 std::to_string(u1_ - u0_) + " (is the KV cache unified and n_ubatch the context's?)");
            return;
        }
        const auto & o = plan_.outputs;
        o0_ = std::lower_bound(o.begin(), o.end(), u0_) - o.begin();
        o1_ = std::lower_bound(o.begin(), o.end(), u1_) - o.begin();
        const auto & c = plan_.cap_tok;
        c0_ = std::lower_bound(c.begin(), c.end(), u0_) - c.begin();
        c1_ = std::lower_bound(c.begin(), c.end(), u1_) - c.begin();
    }
    if (!error_.empty()) return;
    if (!w.ops.empty()) apply_ops(t, w);
    if (capturing() && !w.slot_offsets.empty()) capture(t, w);
}

void Hook::apply_ops(ggml_tensor * t, const Watch & w) {
    const int64_t n_rows = t->ne[1];
    const int64_t stride = static_cast<int64_t>(t->nb[1] / sizeof(float));
    // The last layer's output of a ubatch with no output row has 0 rows (llama.cpp prunes to outputs): there is
    // nothing to edit, and a CUDA launch of 0 blocks would fail.
    if (n_rows == 0) {
        ++n_empty_calls_;
        return;
    }
    n_edited_rows_ += n_rows;
    if (api_.buffer_is_host(t->buffer)) {
        for (size_t i : w.ops) apply_host(ops_[i].second, t->name, static_cast<float *>(t->data), n_rows, stride);
        return;
    }
    if (device_path_ == DevicePath::Cuda && cuda::built() && !host_ops_) {
        for (size_t i : w.ops) {
            std::string err =
                cuda::apply(cuda_.get(), ops_[i].second.view(), static_cast<float *>(t->data), n_rows, stride, n_embd_);
            if (!err.empty()) {
                fail(std::string("CUDA kernel on ") + t->name + ": " + err);
                return;
            }
        }
        return;
    }
    const size_t bytes = static_cast<size_t>(n_rows) * t->nb[1];
    scratch_.resize(bytes / sizeof(float));
    api_.tensor_get(t, scratch_.data(), 0, bytes);
    for (size_t i : w.ops) apply_host(ops_[i].second, t->name, scratch_.data(), n_rows, stride);
    api_.tensor_set(t, scratch_.data(), 0, bytes);
}

void Hook::apply_host(const Op & op, const char * name, float * x, int64_t n_rows, int64_t stride) {
    if (op.kind != OpKind::Save && op.kind != OpKind::AblateDelta) {
        cpu::apply(op.view(), x, n_rows, stride, n_embd_);
        return;
    }
    auto & saved = saved_[static_cast<size_t>(op.slot)];
    const auto width = static_cast<size_t>(n_embd_);
    if (op.kind == OpKind::Save) {
        saved.resize(static_cast<size_t>(n_rows) * width);
        for (int64_t r = 0; r < n_rows; ++r) std::copy_n(x + r * stride, n_embd_, saved.data() + r * n_embd_);
        return;
    }
    // The residual after the block has the rows of the one before it, or, in the last layer, only the
    // output rows among them (llama.cpp prunes with inp_out_ids before the residual add).
    const int64_t n_saved = static_cast<int64_t>(saved.size() / width);
    const bool pruned = n_rows != n_saved;
    if (pruned && !(tracking() && ubatch_ >= 0 && n_saved == u1_ - u0_ && n_rows == o1_ - o0_)) {
        fail(std::string("tensor ") + name + " has " + std::to_string(n_rows) + " rows and its block input " +
             std::to_string(n_saved) + "; no row map for this decode");
        return;
    }
    // The block's write y = after - before becomes y - d (d.y) (k = 1), or s * (y - a (b.y)) (k = 3: the
    // norm-preserving edit, a row scale after a rank-1 map).
    const float * a = op.dirs.data();
    const float * b = op.k == 3 ? a + n_embd_ : a;
    const float * sc = op.k == 3 ? a + 2 * n_embd_ : nullptr;
    for (int64_t r = 0; r < n_rows; ++r) {
        float * h = x + r * stride;
        const float * before = saved.data() + (pruned ? plan_.outputs[o0_ + r] - u0_ : r) * n_embd_;
        double c = 0.0;
        for (int64_t i = 0; i < n_embd_; ++i)
            c += (static_cast<double>(h[i]) - static_cast<double>(before[i])) * static_cast<double>(b[i]);
        const auto cf = static_cast<float>(c);
        if (sc == nullptr) {
            for (int64_t i = 0; i < n_embd_; ++i) h[i] -= cf * a[i];
        } else {
            for (int64_t i = 0; i < n_embd_; ++i) h[i] = before[i] + sc[i] * ((h[i] - before[i]) - cf * a[i]);
        }
    }
}

void Hook::capture(ggml_tensor * t, const Watch & w) {
    if (ubatch_ < 0) {
        fail(std::string("tensor ") + t->name + " was evaluated before the embedding of its ubatch");
        return;
    }
    // The last layer keeps only the output rows (llama.cpp prunes them with inp_out_ids before the residual add).
    const bool full = t->ne[1] == u1_ - u0_;
    if (!full && t->ne[1] != o1_ - o0_) {
        fail(std::string("tensor ") + t->name + " has " + std::to_string(t->ne[1]) + " rows; expected " +
             std::to_string(u1_ - u0_) + " tokens or " + std::to_string(o1_ - o0_) + " outputs");
        return;
    }
    const bool host = api_.buffer_is_host(t->buffer);
    const size_t row_bytes = sizeof(float) * static_cast<size_t>(n_embd_);
    auto o_it = plan_.outputs.begin() + o0_;
    const auto o_end = plan_.outputs.begin() + o1_;
    for (int64_t c = c0_; c < c1_; ++c) {
        const int64_t tok = plan_.cap_tok[c];
        int64_t row = tok - u0_;
        if (!full) {
            o_it = std::lower_bound(o_it, o_end, tok);
            if (o_it == o_end || *o_it != tok) {
                fail(std::string("captured token ") + std::to_string(tok) + " is not an output row of " + t->name);
                return;
            }
            row = o_it - (plan_.outputs.begin() + o0_);
        }
        const size_t offs = static_cast<size_t>(row) * t->nb[1];
        const float * src;
        if (host) {
            src = reinterpret_cast<const float *>(static_cast<const char *>(t->data) + offs);
        } else {
            scratch_.resize(static_cast<size_t>(n_embd_));
            api_.tensor_get(t, scratch_.data(), offs, row_bytes);
            src = scratch_.data();
        }
        for (int64_t slot : w.slot_offsets) std::memcpy(plan_.out + plan_.cap_dst[c] + slot, src, row_bytes);
    }
}

}  // namespace pysteer
