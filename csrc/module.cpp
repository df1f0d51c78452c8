// pysteer._core: the only boundary between Python and the hook. Addresses in, numpy buffers in, strings out.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <tuple>

#include "hook.h"

namespace py = pybind11;
using pysteer::DecodePlan;
using pysteer::DevicePath;
using pysteer::GgmlApi;
using pysteer::Hook;
using pysteer::Op;
using pysteer::OpKind;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

template <typename F>
F address_of(const py::dict & table, const char * name) {
    if (!table.contains(name)) throw std::invalid_argument(std::string("missing ggml function: ") + name);
    auto addr = table[name].cast<std::uintptr_t>();
    if (addr == 0) throw std::invalid_argument(std::string("null address for ggml function: ") + name);
    return reinterpret_cast<F>(addr);
}

std::vector<int64_t> to_vector(const I64Array & a) {
    if (a.ndim() != 1) throw std::invalid_argument("index arrays must be 1-D");
    return std::vector<int64_t>(a.data(), a.data() + a.size());
}

bool strictly_increasing(const std::vector<int64_t> & v, int64_t lo, int64_t hi) {
    for (size_t i = 0; i < v.size(); ++i) {
        if (v[i] < lo || v[i] >= hi || (i > 0 && v[i] <= v[i - 1])) return false;
    }
    return true;
}

// Keeps the capture buffer alive for as long as the hook may write into it.
struct PyHook {
    Hook hook;
    int64_t n_embd;
    int64_t max_slot = 0;  // largest capture slot offset set by set_capture
    py::object out_ref;

    PyHook(const py::dict & table, int64_t n_embd_) : hook(make_api(table), n_embd_), n_embd(n_embd_) {
        if (n_embd_ <= 0) throw std::invalid_argument("n_embd must be positive");
    }

    static GgmlApi make_api(const py::dict & table) {
        GgmlApi api;
        api.buffer_is_host = address_of<decltype(api.buffer_is_host)>(table, "ggml_backend_buffer_is_host");
        api.tensor_get = address_of<decltype(api.tensor_get)>(table, "ggml_backend_tensor_get");
        api.tensor_set = address_of<decltype(api.tensor_set)>(table, "ggml_backend_tensor_set");
        return api;
    }

    void set_capture(const std::vector<std::string> & names, const std::vector<std::vector<int64_t>> & slots,
                     const std::string & marker, const std::string & stop_after) {
        if (names.size() != slots.size()) throw std::invalid_argument("names and slots differ in length");
        for (const auto & n : names) check_name(n);
        check_name(marker);
        if (!stop_after.empty() && std::find(names.begin(), names.end(), stop_after) == names.end())
            throw std::invalid_argument("stop_after must be one of the captured names");
        int64_t top = 0;
        for (const auto & v : slots) {
            for (int64_t s : v) {
                if (s < 0 || s % n_embd != 0) throw std::invalid_argument("capture slot offsets must be non-negative multiples of n_embd");
                top = std::max(top, s);
            }
        }
        hook.set_capture(names, slots, marker, stop_after);
        max_slot = top;
    }

    void clear_capture() {
        hook.clear_capture();
        max_slot = 0;
    }

    void begin_decode(int64_t n_tokens, int64_t n_ubatch, const I64Array & outputs, const I64Array & cap_tok,
                      const I64Array & cap_dst, py::array_t<float, py::array::c_style> out) {
        if (n_tokens <= 0 || n_ubatch <= 0) throw std::invalid_argument("n_tokens and n_ubatch must be positive");
        DecodePlan plan;
        plan.n_tokens = n_tokens;
        plan.n_ubatch = n_ubatch;
        plan.outputs = to_vector(outputs);
        plan.cap_tok = to_vector(cap_tok);
        plan.cap_dst = to_vector(cap_dst);
        if (!strictly_increasing(plan.outputs, 0, n_tokens) || !strictly_increasing(plan.cap_tok, 0, n_tokens))
            throw std::invalid_argument("token indices must be increasing and inside the batch");
        if (plan.cap_dst.size() != plan.cap_tok.size())
            throw std::invalid_argument("cap_tok and cap_dst differ in length");
        if (!out.writeable()) throw std::invalid_argument("capture buffer is read-only");
        // Every write of the callback lands in [cap_dst + slot, cap_dst + slot + n_embd) with slot <= max_slot.
        for (int64_t d : plan.cap_dst) {
            if (d < 0 || d > static_cast<int64_t>(out.size()) - max_slot - n_embd)
                throw std::invalid_argument("capture offset outside the buffer");
        }
        plan.out = out.size() ? out.mutable_data() : nullptr;  // empty: rows only (ops that need them), no capture
        out_ref = out;
        hook.begin_decode(std::move(plan));
    }

    std::string end_decode() {
        std::string err = hook.end_decode();
        out_ref = py::none();
        return err;
    }

    // ops: (tensor name, kind, dirs [k, n_embd], cos, sin, adaptive, slot) in the order they apply.
    void set_ops(const std::vector<std::tuple<std::string, int, FloatArray, double, double, bool, int64_t>> & ops,
                 const std::string & row_marker) {
        std::vector<std::pair<std::string, Op>> built;
        built.reserve(ops.size());
        if (!row_marker.empty()) check_name(row_marker);
        std::vector<bool> saved;  // slots a save fills before an ablate_delta reads them, in op order
        for (const auto & [name, kind, dirs, cos_t, sin_t, adaptive, slot] : ops) {
            check_name(name);
            if (kind < 0 || kind > static_cast<int>(OpKind::AblateDelta)) throw std::invalid_argument("unknown op kind");
            if (dirs.ndim() != 2 || dirs.shape(1) != n_embd || dirs.shape(0) < 1 || dirs.shape(0) > n_embd)
                throw std::invalid_argument("op directions must have shape [k, n_embd] with 1 <= k <= n_embd");
            const auto op_kind = static_cast<OpKind>(kind);
            if ((op_kind == OpKind::Add && dirs.shape(0) != 1) || (op_kind == OpKind::Rotate && dirs.shape(0) != 2))
                throw std::invalid_argument("add takes 1 vector, rotate 2");
            if (op_kind == OpKind::Save || op_kind == OpKind::AblateDelta) {
                if (dirs.shape(0) != 1 && !(op_kind == OpKind::AblateDelta && dirs.shape(0) == 3))
                    throw std::invalid_argument("save takes 1 vector, ablate_delta 1 or 3");
                if (slot < 0 || slot > (1 << 20)) throw std::invalid_argument("save and ablate_delta need a slot >= 0");
                if (static_cast<size_t>(slot) >= saved.size()) saved.resize(static_cast<size_t>(slot) + 1, false);
                if (op_kind == OpKind::Save) saved[slot] = true;
                else if (!saved[slot]) throw std::invalid_argument("ablate_delta reads a slot no earlier save fills");
                if (op_kind == OpKind::AblateDelta && row_marker.empty())
                    throw std::invalid_argument("ablate_delta needs a row marker");
            }
            const float * d = dirs.data();
            for (py::ssize_t i = 0; i < dirs.size(); ++i)
                if (!std::isfinite(d[i])) throw std::invalid_argument("op directions must be finite");
            built.emplace_back(name, Op{op_kind, dirs.shape(0), std::vector<float>(d, d + dirs.size()),
                                        static_cast<float>(cos_t), static_cast<float>(sin_t), adaptive, slot});
        }
        hook.set_ops(std::move(built), row_marker);
    }

    static void check_name(const std::string & n) {
        if (n.empty() || n.size() >= GGML_MAX_NAME) throw std::invalid_argument("bad tensor name: " + n);
    }
};

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "pysteer's C++ hook on llama.cpp's eval callback";
    m.attr("LLAMA_CPP_PYTHON_VERSION") = PYSTEER_LLAMA_CPP_PYTHON_VERSION;
    m.attr("SIZEOF_GGML_TENSOR") = sizeof(ggml_tensor);
    m.attr("GGML_MAX_NAME") = GGML_MAX_NAME;
    m.attr("CUDA_BUILT") = pysteer::cuda::built();
    // Op kinds of set_ops: the one definition is OpKind (kernels.h).
    m.attr("OP_ABLATE") = static_cast<int>(OpKind::Ablate);
    m.attr("OP_ADD") = static_cast<int>(OpKind::Add);
    m.attr("OP_ROTATE") = static_cast<int>(OpKind::Rotate);
    m.attr("OP_SAVE") = static_cast<int>(OpKind::Save);
    m.attr("OP_ABLATE_DELTA") = static_cast<int>(OpKind::AblateDelta);

    py::class_<PyHook>(m, "Hook")
        .def(py::init<const py::dict &, int64_t>(), py::arg("ggml_functions"), py::arg("n_embd"))
        .def("set_capture", &PyHook::set_capture, py::arg("names"), py::arg("slots"), py::arg("marker"),
             py::arg("stop_after") = "")
        .def("clear_capture", &PyHook::clear_capture)
        .def("set_ops", &PyHook::set_ops, py::arg("ops"), py::arg("row_marker") = "")
        .def_property_readonly("n_ops", [](PyHook & h) { return h.hook.n_ops(); })
        .def_property_readonly("n_edited_rows", [](PyHook & h) { return h.hook.n_edited_rows(); },
                               "rows edited by interventions since the hook was made (a running count)")
        .def_property_readonly("n_empty_calls", [](PyHook & h) { return h.hook.n_empty_calls(); },
                               "edited tensors that arrived with 0 rows (skipped; a running count)")
        .def_property_readonly("n_data_calls", [](PyHook & h) { return h.hook.n_data_calls(); },
                               "callbacks that received data (each ends a graph split; a running count)")
        .def_property_readonly("callback_seconds", [](PyHook & h) { return h.hook.callback_seconds(); },
                               "time spent inside those callbacks (a running total)")
        .def("use_cuda_kernels",
             [](PyHook & h, bool on) {
                 if (on && !pysteer::cuda::built()) throw std::invalid_argument("pysteer was built without CUDA");
                 h.hook.set_device_path(on ? DevicePath::Cuda : DevicePath::Copy);
             },
             py::arg("on"))
        .def("begin_decode", &PyHook::begin_decode, py::arg("n_tokens"), py::arg("n_ubatch"), py::arg("outputs"),
             py::arg("cap_tok"), py::arg("cap_dst"), py::arg("out").noconvert())  // a converted copy would receive the rows instead of the caller's array
        .def("end_decode", &PyHook::end_decode)
        .def_property_readonly("callback_address",
                               [](PyHook &) { return reinterpret_cast<std::uintptr_t>(&Hook::eval_callback); })
        .def_property_readonly("abort_address",
                               [](PyHook &) { return reinterpret_cast<std::uintptr_t>(&Hook::abort_callback); })
        .def_property_readonly("user_data", [](PyHook & h) { return reinterpret_cast<std::uintptr_t>(&h.hook); });
}
