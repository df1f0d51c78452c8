// pysteer._core: the only boundary between Python and the hook. Addresses in, numpy buffers in, strings out.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>

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

    void begin_decode(int64_t n_tokens, int64_t n_ubatch, const I64Array & outputs, const I64Array & cap_tok,
                      const I64Array & cap_dst, int64_t max_slot_offset,
                      py::array_t<float, py::array::c_style> out) {
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
        for (int64_t d : plan.cap_dst) {
            if (d < 0 || d + max_slot_offset + n_embd > static_cast<int64_t>(out.size()))
                throw std::invalid_argument("capture offset outside the buffer");
        }
        plan.out = out.mutable_data();
        out_ref = out;
        hook.begin_decode(std::move(plan));
    }

    std::string end_decode() {
        std::string err = hook.end_decode();
        out_ref = py::none();
        return err;
    }

    void add_op(const std::string & name, int kind, py::array_t<float, py::array::c_style | py::array::forcecast> dirs,
                double cos_t, double sin_t, bool adaptive) {
        check_name(name);
        if (kind < 0 || kind > 2) throw std::invalid_argument("unknown op kind");
        if (dirs.ndim() != 2 || dirs.shape(1) != n_embd || dirs.shape(0) < 1)
            throw std::invalid_argument("op directions must have shape [k, n_embd]");
        const auto op_kind = static_cast<OpKind>(kind);
        if ((op_kind == OpKind::Add && dirs.shape(0) != 1) || (op_kind == OpKind::Rotate && dirs.shape(0) != 2))
            throw std::invalid_argument("add takes 1 vector, rotate 2");
        Op op{op_kind, dirs.shape(0), std::vector<float>(dirs.data(), dirs.data() + dirs.size()),
              static_cast<float>(cos_t), static_cast<float>(sin_t), adaptive};
        hook.add_op(name, std::move(op));
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

    py::class_<PyHook>(m, "Hook")
        .def(py::init<const py::dict &, int64_t>(), py::arg("ggml_functions"), py::arg("n_embd"))
        .def("set_capture",
             [](PyHook & h, const std::vector<std::string> & names, const std::vector<std::vector<int64_t>> & slots,
                const std::string & marker) {
                 if (names.size() != slots.size()) throw std::invalid_argument("names and slots differ in length");
                 for (const auto & n : names) PyHook::check_name(n);
                 PyHook::check_name(marker);
                 h.hook.set_capture(names, slots, marker);
             },
             py::arg("names"), py::arg("slots"), py::arg("marker"))
        .def("clear_capture", [](PyHook & h) { h.hook.clear_capture(); })
        .def("add_op", &PyHook::add_op, py::arg("name"), py::arg("kind"), py::arg("dirs"), py::arg("cos") = 1.0,
             py::arg("sin") = 0.0, py::arg("adaptive") = false)
        .def("clear_ops", [](PyHook & h) { h.hook.clear_ops(); })
        .def_property_readonly("n_ops", [](PyHook & h) { return h.hook.n_ops(); })
        .def_property_readonly("n_edited_rows", [](PyHook & h) { return h.hook.n_edited_rows(); },
                               "rows edited by interventions since the hook was made (a running count)")
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
             py::arg("cap_tok"), py::arg("cap_dst"), py::arg("max_slot_offset"),
             py::arg("out").noconvert())  // a converted copy would receive the rows instead of the caller's array
        .def("end_decode", &PyHook::end_decode)
        .def_property_readonly("callback_address",
                               [](PyHook &) { return reinterpret_cast<std::uintptr_t>(&Hook::eval_callback); })
        .def_property_readonly("abort_address",
                               [](PyHook &) { return reinterpret_cast<std::uintptr_t>(&Hook::abort_callback); })
        .def_property_readonly("user_data", [](PyHook & h) { return reinterpret_cast<std::uintptr_t>(&h.hook); });
}
