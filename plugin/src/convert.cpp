// Python values <-> wire::value, following the seed's serialization rules.
//
// Type checks are exact (type(o) is dict, not isinstance): a subclass such as
// OrderedDict or IntEnum would reach the peer as its own class, which the peer must
// refuse, so it is refused here, before anything is sent. The wire classes of
// mitogen_native.core are the only user-defined types allowed.
#include <string>

#include "bindings.hpp"

namespace mitogen::python {
namespace {

/// Where a value sits inside the call's arguments, rendered only for error messages
/// (so the common path builds no strings).
struct path_node {
  const path_node* up = nullptr;
  const char* root = nullptr;  // set on the root node only
  Py_ssize_t index = -1;       // list/tuple position
  PyObject* key = nullptr;     // dict key (borrowed)
  bool is_key = false;         // the value is a dict key, not a value
};

std::string render(const path_node* p) {
  if (!p) return "";
  if (p->root) return p->root;
  std::string s = render(p->up);
  if (p->is_key) return "a key of " + s;
  if (p->key) return s + "[" + py::repr(p->key).cast<std::string>() + "]";
  return s + "[" + std::to_string(p->index) + "]";
}

std::string type_name(PyObject* o) {
  auto t = py::type::handle_of(o);
  std::string mod = py::str(t.attr("__module__"));
  std::string name = py::str(t.attr("__qualname__"));
  return mod == "builtins" ? name : mod + "." + name;
}

[[noreturn]] void refuse(PyObject* o, const path_node* where) {
  std::string msg = "cannot send value of type " + type_name(o) + " at " + render(where) +
                    ": only None, bool, int, float, bytes, bytearray, str, list, tuple, dict and the "
                    "mitogen_native.core wire classes may cross the wire";
  throw py::type_error(msg);
}

constexpr int max_depth = 100;  // same bound as the decoder on the other side

wire::value convert(PyObject* o, const path_node* where, int depth);

template <class Seq>
void convert_items(PyObject* const* items, Py_ssize_t n, Seq& out, const path_node* where, int depth) {
  out.items.reserve(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    path_node p{where, nullptr, i};
    out.items.push_back(convert(items[i], &p, depth + 1));
  }
}

template <class Seq>
void convert_items(PyObject* o, Seq& out, const path_node* where, int depth) {
  // PySequence_Fast_ITEMS is valid for exact lists and tuples only, which is all we get.
  convert_items(PySequence_Fast_ITEMS(o), PySequence_Fast_GET_SIZE(o), out, where, depth);
}

template <class Map>
void convert_item(PyObject* k, PyObject* v, Map& out, const path_node* where, int depth) {
  path_node pk{where, nullptr, -1, k, true};
  path_node pv{where, nullptr, -1, k};
  wire::value key = convert(k, &pk, depth + 1);
  out.items.emplace_back(std::move(key), convert(v, &pv, depth + 1));
}

template <class Map>
void convert_dict(PyObject* o, Map& out, const path_node* where, int depth) {
  Py_ssize_t pos = 0;
  PyObject *k, *v;
  out.items.reserve(static_cast<std::size_t>(PyDict_Size(o)));
  while (PyDict_Next(o, &pos, &k, &v)) convert_item(k, v, out, where, depth);
}

wire::big_int to_big_int(PyObject* o) {
  // Minimal two's complement: the bits of the magnitude (of ~n for negative n, so
  // that -128 fits one byte) plus a sign bit, rounded up to whole bytes.
  py::handle h(o);
  py::int_ zero(0);
  int negative = PyObject_RichCompareBool(o, zero.ptr(), Py_LT);
  if (negative < 0) throw py::error_already_set();
  py::object magnitude = negative ? py::reinterpret_steal<py::object>(PyNumber_Invert(o))
                                  : py::reinterpret_borrow<py::object>(o);
  if (!magnitude) throw py::error_already_set();
  auto bits = magnitude.attr("bit_length")().cast<std::size_t>();
  py::bytes b = h.attr("to_bytes")((bits + 8) / 8, "little", py::arg("signed") = true);
  return wire::big_int{std::string(b)};
}

std::string bytes_of(PyObject* o) { return std::string(PyBytes_AS_STRING(o), static_cast<std::size_t>(PyBytes_GET_SIZE(o))); }

std::string utf8_of(PyObject* o) {
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);
  if (!s) throw py::error_already_set();  // lone surrogates
  return std::string(s, static_cast<std::size_t>(n));
}

wire::value convert(PyObject* o, const path_node* where, int depth) {
  if (depth > max_depth)
    throw py::type_error("cannot send value nested more than " + std::to_string(max_depth) + " deep at " +
                          render(where));
  PyTypeObject* t = Py_TYPE(o);
  // The common types first, by exact type; bool before int is implied (bool is its own type).
  if (o == Py_None) return wire::none{};
  if (t == &PyBool_Type) return o == Py_True;
  if (t == &PyLong_Type) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (!overflow) {
      if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
      return std::int64_t{v};
    }
    return to_big_int(o);
  }
  if (t == &PyUnicode_Type) return wire::str{utf8_of(o)};
  if (t == &PyBytes_Type) return wire::bytes{bytes_of(o)};
  if (t == &PyFloat_Type) return PyFloat_AS_DOUBLE(o);
  if (t == &PyTuple_Type) {
    wire::tuple out;
    convert_items(o, out, where, depth);
    return out;
  }
  if (t == &PyList_Type) {
    wire::list out;
    convert_items(o, out, where, depth);
    return out;
  }
  if (t == &PyDict_Type) {
    wire::dict out;
    convert_dict(o, out, where, depth);
    return out;
  }
  if (t == &PyByteArray_Type)
    return wire::bytearray{std::string(PyByteArray_AS_STRING(o), static_cast<std::size_t>(PyByteArray_GET_SIZE(o)))};

  // The wire classes of mitogen_native.core.
  auto& w = types();
  auto is = [t](const py::object& cls) { return cls && reinterpret_cast<PyObject*>(t) == cls.ptr(); };
  if (py::isinstance<py_context>(o)) {
    const auto& c = py::handle(o).cast<const py_context&>().ctx;
    return wire::context_ref{c.id(), c.name()};
  }
  if (is(w.Kwargs)) {
    wire::kwargs out;
    convert_dict(o, out, where, depth);
    return out;
  }
  if (is(w.Blob)) return wire::blob{bytes_of(o)};
  if (is(w.Secret)) return wire::secret{utf8_of(o)};
  if (is(w.CallError)) {
    py::handle h(o);
    py::tuple args = h.attr("args");
    return wire::call_error{args.empty() ? std::string() : py::str(args[0]).cast<std::string>()};
  }
  if (is(w.DEAD)) return wire::dead{};
  if (is(w.Sender)) {
    py::handle h(o);
    py::object ctx = h.attr("context");
    if (!py::isinstance<py_context>(ctx)) refuse(o, where);
    const auto& c = ctx.cast<const py_context&>().ctx;
    auto handle = h.attr("dst_handle").cast<std::uint32_t>();
    note_sender(c, handle);  // whoever receives this Sender may send to our handle
    return wire::sender_ref{c.id(), handle};
  }
  refuse(o, where);
}

// ---- wire -> Python

py::object str_of(const std::string& s) {
  // surrogatepass: CPython's pickle writes lone surrogates that way, and so may a peer.
  PyObject* u = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogatepass");
  if (!u) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(u);
}

py::object bytes_obj(const std::string& s) {
  return py::reinterpret_steal<py::object>(PyBytes_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size())));
}

struct to_python {
  const py::object& router;

  py::object operator()(wire::none&) const { return py::none(); }
  py::object operator()(bool& b) const { return py::bool_(b); }
  py::object operator()(std::int64_t& i) const { return py::reinterpret_steal<py::object>(PyLong_FromLongLong(i)); }
  py::object operator()(wire::big_int& b) const {
    return py::module_::import("builtins").attr("int").attr("from_bytes")(py::bytes(b.le_bytes), "little",
                                                                          py::arg("signed") = true);
  }
  py::object operator()(double& d) const { return py::float_(d); }
  py::object operator()(wire::bytes& b) const { return bytes_obj(b.data); }
  py::object operator()(wire::bytearray& b) const {
    return py::reinterpret_steal<py::object>(
        PyByteArray_FromStringAndSize(b.data.data(), static_cast<Py_ssize_t>(b.data.size())));
  }
  py::object operator()(wire::blob& b) const { return types().Blob(bytes_obj(b.data)); }
  py::object operator()(wire::str& s) const { return str_of(s.utf8); }
  py::object operator()(wire::secret& s) const { return types().Secret(str_of(s.utf8)); }
  py::object operator()(wire::list& l) const {
    py::list out(l.items.size());
    for (std::size_t i = 0; i < l.items.size(); ++i) {
      py::object item = from_wire(std::move(l.items[i]), router);
      PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), item.release().ptr());
    }
    return out;
  }
  py::object operator()(wire::tuple& l) const {
    py::tuple out(l.items.size());
    for (std::size_t i = 0; i < l.items.size(); ++i) {
      py::object item = from_wire(std::move(l.items[i]), router);
      PyTuple_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), item.release().ptr());
    }
    return out;
  }
  py::object operator()(wire::dict& d) const { return dict_of(d.items); }
  py::object operator()(wire::kwargs& d) const { return types().Kwargs(dict_of(d.items)); }
  py::object operator()(wire::call_error& e) const { return types().CallError(str_of(e.message)); }
  py::object operator()(wire::context_ref& c) const {
    auto& pr = router.cast<py_router&>();
    std::string name = c.name ? *c.name : pr.r->name_of(c.context_id);
    return make_context(mitogen::context(pr.r, c.context_id, std::move(name)), router);
  }
  py::object operator()(wire::sender_ref& s) const {
    auto& pr = router.cast<py_router&>();
    py::object ctx = make_context(mitogen::context(pr.r, s.context_id, pr.r->name_of(s.context_id)), router);
    return types().Sender(ctx, s.handle);
  }
  py::object operator()(wire::dead&) const { return types().DEAD(); }

  py::object dict_of(std::vector<std::pair<wire::value, wire::value>>& items) const {
    py::dict out;
    for (auto& [k, v] : items) {
      py::object key = from_wire(std::move(k), router);
      py::object val = from_wire(std::move(v), router);
      if (PyDict_SetItem(out.ptr(), key.ptr(), val.ptr()) != 0) throw py::error_already_set();
    }
    return out;
  }
};

}  // namespace

wire_types& types() {
  // Leaked on purpose: destroying Python references after the interpreter is gone
  // (static destructors at exit) would crash.
  static auto* t = new wire_types();
  return *t;
}

wire::value to_wire(py::handle o, const char* root) {
  path_node p{nullptr, root};
  return convert(o.ptr(), &p, 0);
}

wire::tuple args_to_wire(PyObject* const* items, std::size_t n) {
  wire::tuple out;
  path_node root{nullptr, "args"};
  convert_items(items, static_cast<Py_ssize_t>(n), out, &root, 0);
  return out;
}

wire::tuple args_to_wire(const py::args& args, std::size_t first) {
  const std::size_t n = args.size();
  if (n <= first) return {};
  return args_to_wire(PySequence_Fast_ITEMS(args.ptr()) + first, n - first);
}

wire::kwargs kwargs_to_wire(PyObject* kwnames, PyObject* const* values) {
  wire::kwargs out;
  const Py_ssize_t n = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  if (n == 0) return out;
  path_node root{nullptr, "kwargs"};
  out.items.reserve(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) convert_item(PyTuple_GET_ITEM(kwnames, i), values[i], out, &root, 0);
  return out;
}

wire::kwargs kwargs_to_wire(const py::kwargs& kw) {
  wire::kwargs out;
  if (!kw || PyDict_Size(kw.ptr()) == 0) return out;
  path_node root{nullptr, "kwargs"};
  convert_dict(kw.ptr(), out, &root, 0);
  return out;
}

py::object from_wire(wire::value&& v, const py::object& router) {
  return std::visit(to_python{router}, v.get());
}

py::object option(const char* fn, const char* name, const py::object& v) {
  if (v.is_none()) return v;
  return py::module_::import("mitogen_native._options").attr(fn)(name, v);
}

std::optional<double> seconds_option(const char* name, const py::object& v) {
  py::object f = option("as_float", name, v);
  if (f.is_none()) return std::nullopt;
  return f.cast<double>();
}

void register_convert(py::module_& m) {
  m.def(
      "_register_types",
      [](py::object Kwargs, py::object Blob, py::object Secret, py::object CallError, py::object Sender,
         py::object DEAD, py::object Error, py::object ChannelError, py::object StreamError,
         py::object TimeoutError) {
        auto& t = types();
        t = wire_types{Kwargs, Blob, Secret, CallError, Sender, DEAD, Error, ChannelError, StreamError, TimeoutError};
      },
      py::kw_only(), py::arg("Kwargs"), py::arg("Blob"), py::arg("Secret"), py::arg("CallError"), py::arg("Sender"),
      py::arg("_DEAD"), py::arg("Error"), py::arg("ChannelError"), py::arg("StreamError"), py::arg("TimeoutError"),
      "Called once by mitogen_native.core: the classes the conversions produce and accept.");

  m.def(
      "_roundtrip",
      [](py::handle value, py::object router) {
        // Exactly what a call does to an argument and to a result, minus the child:
        // convert, encode, decode with the core's restricted decoder, convert back.
        std::string data = wire::encode(to_wire(value, "value"));
        auto r = wire::decode(data);
        if (!r) throw py::value_error("decode failed: " + r.detail);
        return from_wire(std::move(r.v), router);
      },
      py::arg("value"), py::arg("router"), "Testing aid: value -> wire -> pickle -> wire -> value.");
}

}  // namespace mitogen::python
