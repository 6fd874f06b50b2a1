// pyserve._grpc_native: the binding layer. Threads that poll the transport's completion queue run
// each new RPC's Python handler (pyserve.server._native_engine) with the GIL held; one control
// thread runs end-of-RPC callbacks; and a thin Call object for Python.
// Every blocking wait (queue, read, write, shutdown) releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <atomic>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>

#include "grpc_native/transport.h"

namespace py = pybind11;
using pyserve::grpc_native::Call;
using pyserve::grpc_native::Metadata;
using pyserve::grpc_native::Task;
using pyserve::grpc_native::TaskKind;
using pyserve::grpc_native::TlsConfig;
using pyserve::grpc_native::Transport;

namespace {

py::bytes ToBytes(const grpc::ByteBuffer& buf) {
  std::vector<grpc::Slice> slices;
  if (!buf.Valid()) return py::bytes("", 0);
  (void)buf.Dump(&slices);
  size_t n = 0;
  for (const auto& s : slices) n += s.size();
  PyObject* out = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n));
  if (out == nullptr) throw py::error_already_set();
  char* dst = PyBytes_AS_STRING(out);
  for (const auto& s : slices) {
    std::memcpy(dst, s.begin(), s.size());
    dst += s.size();
  }
  return py::reinterpret_steal<py::bytes>(out);
}

py::object MetadataValue(const std::string& key, const std::string& value) {
  if (key.size() >= 4 && key.compare(key.size() - 4, 4, "-bin") == 0) return py::bytes(value);
  return py::str(PyUnicode_DecodeUTF8(value.data(), static_cast<Py_ssize_t>(value.size()), "replace"));
}

Metadata ToMetadata(const py::object& seq, const char* what) {
  Metadata md;
  if (seq.is_none()) return md;
  for (const auto& item : seq) {
    auto pair = py::reinterpret_borrow<py::sequence>(item);
    if (py::len(pair) != 2) throw py::value_error(std::string(what) + ": each item must be a (key, value) pair");
    std::string key = py::str(pair[0]);
    py::object v = pair[1];
    std::string value = py::isinstance<py::bytes>(v) ? std::string(py::bytes(v)) : std::string(py::str(v));
    md.emplace_back(std::move(key), std::move(value));
  }
  return md;
}

void SetUser(Call& call, py::object obj) {
  void* old = call.ExchangeUser(obj.is_none() ? nullptr : obj.release().ptr());
  Py_XDECREF(static_cast<PyObject*>(old));
}

py::object GetUser(Call& call) {
  void* user = call.User();
  if (user == nullptr) return py::none();
  return py::reinterpret_borrow<py::object>(static_cast<PyObject*>(user));
}

// True on the Engine's own threads (polling/handler threads and the control thread).
thread_local bool t_engine_thread = false;
// Set on a polling thread whose handler is a stream (Engine::ReleaseSlot): the thread leaves once
// the handler returns, a new one having taken its place among the pollers.
thread_local bool t_stream_thread = false;
thread_local bool t_handler_thread = false;  // a polling thread (Serve), not the control thread

// The transport plus its polling/handler threads and the control thread.
class Engine {
 public:
  Engine(py::function dispatch, py::function ended, int workers, int max_stream_threads)
      : transport_(workers),
        dispatch_(std::move(dispatch)),
        ended_(std::move(ended)),
        n_workers_(workers),
        max_stream_threads_(max_stream_threads) {
    if (workers < 1) throw py::value_error("Engine: workers must be >= 1, got " + std::to_string(workers));
    if (max_stream_threads < 0)
      throw py::value_error("Engine: max_stream_threads must be >= 0, got " + std::to_string(max_stream_threads));
  }
  ~Engine() {
    try {
      Stop();
    } catch (...) {
    }
  }

  int Start(const std::string& address, int max_receive_bytes, int max_send_bytes, py::object tls) {
    if (started_) throw std::runtime_error("Engine.start: already started");
    if (max_receive_bytes <= 0 || max_send_bytes <= 0)
      throw py::value_error("Engine.start: max message sizes must be > 0");
    TlsConfig cfg;
    if (!tls.is_none()) {
      auto t = tls.cast<py::tuple>();
      if (py::len(t) != 3) throw py::value_error("Engine.start: tls must be (cert_chain, private_key, client_ca or None)");
      cfg.enabled = true;
      cfg.cert_chain = t[0].cast<std::string>();
      cfg.private_key = t[1].cast<std::string>();
      if (!t[2].is_none()) cfg.client_ca = t[2].cast<std::string>();
    }
    started_ = true;
    int port;
    {
      py::gil_scoped_release release;
      port = transport_.Start(address, max_receive_bytes, max_send_bytes, cfg);
    }
    if (port != 0) {  // workers + 1 threads poll: at most `workers` run handlers, one always polls
      std::lock_guard<std::mutex> lk(threads_mu_);
      for (int i = 0; i <= n_workers_; ++i) Spawn([this] { Serve(); });
      Spawn([this] { Ends(); });
    }
    return port;
  }

  // Called by a handler (GIL held) about to serve a stream: its slot is released and one more
  // polling thread started, so open streams hold no handler slot (health checks and unary RPCs go
  // on); the stream's thread leaves when its handler returns. False (the stream keeps its slot)
  // when not on a handler thread or when `max_stream_threads` streams already have their own.
  bool ReleaseSlot() {
    if (!t_handler_thread || t_stream_thread || stopped_) return false;
    std::lock_guard<std::mutex> lk(threads_mu_);
    Reap();
    if (stream_threads_.load() >= max_stream_threads_) return false;
    // the slot first, so that the new thread's first NextCall can take an RPC waiting for one
    transport_.ReleaseSlot();
    try {
      Spawn([this] { Serve(); });
    } catch (const std::exception&) {  // no thread to be had (EAGAIN: a pid or memory limit):
      transport_.RetakeSlot();          // the stream keeps its slot, and nothing polls less
      return false;
    }
    ++stream_threads_;
    t_stream_thread = true;
    return true;
  }

  void Refuse() { transport_.Refuse(); }

  void Shutdown(double grace_s) {
    py::gil_scoped_release release;
    transport_.Shutdown(grace_s);
  }

  // Shuts the server down at once (if still running) and joins the threads.
  void Stop() {
    if (!started_ || stopped_) return;
    stopped_ = true;
    py::gil_scoped_release release;
    transport_.Shutdown(0.0);
    transport_.ends.Close();
    std::lock_guard<std::mutex> lk(threads_mu_);
    for (auto& t : threads_) t.thread.join();
    threads_.clear();
  }

  int Active() const { return transport_.Active(); }
  int Counted() const { return transport_.Counted(); }
  const std::string& Error() const { return transport_.error(); }

 private:
  static void Name(const char* name) {
#ifdef __linux__
    pthread_setname_np(pthread_self(), name);  // shown in /proc/<pid>/task/<tid>/comm (engine_cpu.py)
#else
    (void)name;
#endif
  }

  // A polling thread: the transport's completion queue with the GIL released, a handler with it held.
  void Serve() {
    Name("pyserve-nworker");
    t_engine_thread = true;
    t_handler_thread = true;
    py::gil_scoped_acquire gil;  // one thread state for the thread's lifetime
    bool handled = false;
    for (;;) {
      std::shared_ptr<Call> call;
      bool ok;
      {
        py::gil_scoped_release release;
        ok = transport_.NextCall(&call, handled);
      }
      if (!ok) break;
      handled = true;
      Run(dispatch_, call, 0);
      // a handler that forgot to finish must not hang the RPC (a deferred one finishes later)
      if (!call->Deferred()) call->Finish(13, "internal error: the handler did not finish the RPC", nullptr, 0, false, {});
      call.reset();  // may drop the last reference, with the GIL held
      if (t_stream_thread) {  // its replacement polls; Reap joins this thread later
        --stream_threads_;
        break;
      }
    }
  }

  // The control thread: end-of-RPC callbacks (kCancel, kDone).
  void Ends() {
    Name("pyserve-nended");
    t_engine_thread = true;
    py::gil_scoped_acquire gil;
    for (;;) {
      Task task;
      bool ok;
      {
        py::gil_scoped_release release;
        ok = transport_.ends.Pop(&task);
      }
      if (!ok) break;
      Run(ended_, task.call, task.kind == TaskKind::kCancel ? 1 : 2);
      if (task.kind == TaskKind::kDone) SetUser(*task.call, py::none());
      task.call.reset();
    }
  }

  static void Run(const py::function& fn, const std::shared_ptr<Call>& call, int kind) {
    try {
      fn(call, kind);
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("pyserve._grpc_native worker");
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
      PyErr_WriteUnraisable(nullptr);
    }
  }

  struct Thread {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> over;
  };
  // Under threads_mu_.
  // Throws (std::system_error, std::bad_alloc) with nothing started when no thread can be had.
  template <class F>
  void Spawn(F fn) {
    auto over = std::make_shared<std::atomic<bool>>(false);
    threads_.reserve(threads_.size() + 1);  // push_back must not throw once the thread runs
    threads_.push_back(Thread{std::thread([fn, over] {
                                fn();
                                over->store(true);
                              }),
                              over});
  }
  // Joins the threads that have left (streams' threads), under threads_mu_.
  void Reap() {
    for (auto it = threads_.begin(); it != threads_.end();) {
      if (it->over->load()) {
        it->thread.join();
        it = threads_.erase(it);
      } else {
        ++it;
      }
    }
  }

  Transport transport_;
  py::function dispatch_, ended_;
  int n_workers_;
  int max_stream_threads_;
  std::atomic<int> stream_threads_{0};  // streams' threads whose handler has not returned yet
  std::mutex threads_mu_;
  std::vector<Thread> threads_;
  bool started_ = false, stopped_ = false;
};

}  // namespace

PYBIND11_MODULE(_grpc_native, m) {
  m.doc() = "pyserve's native gRPC transport (grpc++ completion-queue API). Use pyserve.server._native_engine.";

  py::class_<Call, std::shared_ptr<Call>>(m, "Call", "One RPC, as the Python dispatcher sees it.")
      .def_readonly("method", &Call::method, "``/package.Service/Method`` (str).")
      .def_readonly("peer", &Call::peer, "The client's address, e.g. ``ipv4:127.0.0.1:53412`` (str).")
      .def_readonly("deadline", &Call::deadline_s,
                    "The deadline in ``time.time()`` seconds (float); ``inf`` without one.")
      .def_property_readonly(
          "metadata",
          [](const Call& c) {
            py::tuple out(c.metadata.size());
            for (size_t i = 0; i < c.metadata.size(); ++i)
              out[i] = py::make_tuple(c.metadata[i].first, MetadataValue(c.metadata[i].first, c.metadata[i].second));
            return out;
          },
          "The client's metadata: tuple of (key: str, value: str, or bytes for ``-bin`` keys).")
      .def_property_readonly(
          "first", [](const Call& c) -> py::object { return c.has_first ? py::object(ToBytes(c.first)) : py::none(); },
          "The first request message (bytes), or None when the client sent none.")
      .def_property("context", &GetUser, &SetUser,
                    "The dispatcher's per-call object, or None. Only a call that has one gets the ``ended`` "
                    "callbacks (cancelled, done); it is released when the RPC is done.")
      .def("count_until_done", &Call::CountUntilDone,
           "Count this RPC in ``Engine.counted()`` until grpc++ has finished it (idempotent).")
      .def("is_active", &Call::IsActive, "False once the RPC was cancelled (client, deadline, shutdown) or finished.")
      .def("cancelled", &Call::Cancelled, "True once grpc++ reported the RPC cancelled.")
      .def("done", &Call::Done,
           "True once the RPC is over and released: a context set on the call from then on gets no "
           "``ended`` callback.")
      .def(
          "read",
          [](Call& c) -> py::object {
            grpc::ByteBuffer buf;
            bool ok;
            {
              py::gil_scoped_release release;
              ok = c.Read(&buf);
            }
            if (!ok) return py::none();
            return ToBytes(buf);
          },
          "The next request message (bytes); None at the end of the stream or when the RPC ended. Blocks (GIL released).")
      .def(
          "write",
          [](Call& c, const py::bytes& data) {
            char* ptr;
            Py_ssize_t n;
            PyBytes_AsStringAndSize(data.ptr(), &ptr, &n);
            py::gil_scoped_release release;  // `data` stays referenced by the caller
            return c.Write(ptr, static_cast<size_t>(n));
          },
          py::arg("data"), "Write one response message; True once written, False if the RPC ended. Blocks (GIL released).")
      .def(
          "send_initial_metadata",
          [](Call& c, const py::object& md) { c.SendInitialMetadata(ToMetadata(md, "send_initial_metadata"), true); },
          py::arg("metadata"))
      .def(
          "finish",
          [](Call& c, int code, const std::string& details, const py::object& response, const py::object& trailing) {
            if (code < 0 || code > 16) throw py::value_error("finish: code must be a gRPC status code 0..16, got " + std::to_string(code));
            Metadata md = ToMetadata(trailing, "finish trailing metadata");
            if (response.is_none()) return c.Finish(code, details, nullptr, 0, false, md);
            char* ptr;
            Py_ssize_t n;
            if (PyBytes_AsStringAndSize(response.ptr(), &ptr, &n) != 0) throw py::error_already_set();
            return c.Finish(code, details, ptr, static_cast<size_t>(n), true, md);
          },
          py::arg("code"), py::arg("details"), py::arg("response") = py::none(), py::arg("trailing_metadata") = py::none(),
          "End the RPC: status ``code`` (int 0..16), ``details`` (str), optional last message (bytes; sent only "
          "with code 0) and trailing metadata. False when it had already ended.")
      .def("cancel", &Call::Cancel, "Cancel the RPC from the server side.")
      .def("defer", &Call::Defer,
           "The handler returns without finishing the RPC: the caller promises ``finish`` later, from any "
           "thread (an RPC cancelled meanwhile still needs it, or it is never released).");

  py::class_<Engine>(m, "Engine", R"doc(A grpc++ server whose every RPC goes to Python.

Parameters
----------
dispatch : callable(call: Call, kind: int)
    Runs for each new RPC (kind 0) on the polling thread that read its first message (or, when
    ``workers`` handlers already run, on the next thread to finish one); must end it with
    ``call.finish``.
ended : callable(call: Call, kind: int)
    Runs on one control thread when an RPC is cancelled (kind 1) and when it is done (kind 2).
workers : int
    ``dispatch`` calls at once; ``workers + 1`` threads poll grpc++'s completion queue, so one always
    polls.
max_stream_threads : int
    Streams that may hold no handler slot: a handler that calls ``release_slot`` (a stream, which
    may stay open for as long as its client likes) gives its slot back and one more polling thread
    starts, up to this many at once; past it the stream holds its slot until it ends.
)doc")
      .def(py::init<py::function, py::function, int, int>(), py::arg("dispatch"), py::arg("ended"),
           py::arg("workers"), py::arg("max_stream_threads") = 256)
      .def("start", &Engine::Start, py::arg("address"), py::arg("max_receive_bytes"), py::arg("max_send_bytes"),
           py::arg("tls") = py::none(),
           "Bind ``address`` (``host:port``, port 0: any) and serve; the bound port, or 0 if it cannot bind. "
           "``tls``: (cert_chain PEM, private_key PEM, client CA PEM or None) or None.")
      .def("refuse", &Engine::Refuse, "Answer new RPCs UNAVAILABLE from now on.")
      .def("shutdown", &Engine::Shutdown, py::arg("grace_s"),
           "Stop the server: RPCs still running after ``grace_s`` seconds are cancelled; blocks until all ended.")
      .def("stop", &Engine::Stop, "Shut down at once (if running) and join the worker threads.")
      .def("release_slot", &Engine::ReleaseSlot,
           "Called by a handler about to serve a stream: the stream holds no handler slot (one more thread "
           "polls, and this one leaves when the handler returns). False (the slot kept) when not on a "
           "handler thread or ``max_stream_threads`` streams already hold none.")
      .def("active", &Engine::Active, "RPCs that grpc++ has started and not yet completed.")
      .def_static("on_engine_thread", [] { return t_engine_thread; },
                  "True when called from one of an Engine's threads (a handler or an end-of-RPC callback), "
                  "which must not wait for the Engine to stop: it would wait for itself.")
      .def("counted", &Engine::Counted, "RPCs marked with ``Call.count_until_done`` that are not done yet.")
      .def_property_readonly("error", &Engine::Error);
}
