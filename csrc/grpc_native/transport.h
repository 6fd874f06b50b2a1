// pyserve._grpc_native, transport layer: a grpc++ server with one CallbackGenericService that hands
// every RPC (raw ByteBuffers, any method) to a task queue. No Python here; module.cpp runs the
// queue's tasks on threads that hold the GIL.
//
// Life of a call: grpc++ creates a Reactor (CreateReactor), which reads the first request message
// and then posts a kStart task. The handler (Python) reads further messages with Call::Read,
// writes with Call::Write (both block the calling thread until grpc++ reports completion) and ends
// the RPC with Call::Finish exactly once. OnCancel (client cancel, deadline, server shutdown) and
// OnDone post kEnd tasks to a second queue, so that end-of-RPC callbacks run even when every worker
// is blocked in a long-lived stream.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace pyserve::grpc_native {

using Metadata = std::vector<std::pair<std::string, std::string>>;

class Reactor;

// One RPC as the handler sees it. Thread-safe; Read/Write/Finish come from the one handler thread.
class Call {
 public:
  // Set when the call is created, read-only afterwards.
  std::string method;       // "/package.Service/Method"
  std::string peer;         // e.g. "ipv4:127.0.0.1:53412"
  Metadata metadata;        // the client's metadata, in order (binary "-bin" values raw)
  double deadline_s = 0.0;  // system-clock seconds since the epoch; +inf without a deadline
  bool has_first = false;   // false: the client half-closed before sending a message
  grpc::ByteBuffer first;   // the first request message (when has_first)

  // The binding layer's per-call object (a PyObject*, owned by module.cpp), or nullptr. Only calls
  // that have one get kCancel/kDone tasks: an RPC nobody asked to hear the end of costs no task.
  // Returns the previous one.
  void* ExchangeUser(void* user);
  void* User() {
    std::lock_guard<std::mutex> lk(mu_);
    return user_;
  }
  // Count this RPC in Transport::Counted() until it is done (idempotent).
  void CountUntilDone();

  bool IsActive() const { return !cancelled_.load() && !finished_.load(); }
  bool Cancelled() const { return cancelled_.load(); }
  // Blocks until the next request message is in `out` (true) or the stream ended or the call was
  // cancelled or finished (false).
  bool Read(grpc::ByteBuffer* out);
  // Blocks until the message is written (true) or failed (cancelled, finished: false).
  bool Write(const char* data, size_t size);
  // Adds initial metadata; sent with the first message, or now when `send_now`.
  void SendInitialMetadata(const Metadata& md, bool send_now);
  // Ends the RPC with a status (code: a grpc_status_code), optional trailing metadata and an
  // optional last message (response != nullptr). Returns false if already finished (a no-op).
  bool Finish(int code, const std::string& details, const char* response, size_t response_size,
              bool with_response, const Metadata& trailing);
  // Server-side cancel (ServerContext::TryCancel).
  void Cancel();

 private:
  friend class Reactor;
  std::mutex mu_;
  std::condition_variable cv_;
  Reactor* reactor_ = nullptr;  // valid until OnDone (which needs Finish first)
  class Transport* transport_ = nullptr;
  void* user_ = nullptr;
  std::atomic<bool> counted_{false};
  grpc::CallbackServerContext* ctx_ = nullptr;
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> finished_{false};
  bool done_ = false;
  bool read_done_ = false, read_ok_ = false;
  bool write_done_ = false, write_ok_ = false;
  grpc::ByteBuffer read_buf_;
  grpc::ByteBuffer write_buf_;
  grpc::ByteBuffer last_buf_;
  bool started_ = false;
};

enum class TaskKind { kStart, kCancel, kDone };

struct Task {
  TaskKind kind;
  std::shared_ptr<Call> call;
};

// Unbounded multi-producer, multi-consumer queue of tasks; Pop blocks until a task or Close.
class TaskQueue {
 public:
  void Push(Task task);
  bool Pop(Task* out);  // false once closed and empty
  void Close();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> tasks_;
  bool closed_ = false;
};

struct TlsConfig {
  bool enabled = false;
  std::string cert_chain, private_key, client_ca;  // PEM; client_ca empty: no client certificates
};

// The grpc++ server. Start once, Shutdown once.
class Transport : public grpc::CallbackGenericService {
 public:
  TaskQueue calls;  // kStart
  TaskQueue ends;   // kCancel, kDone

  // Binds `address` ("host:port"; port 0 = any free port) and starts serving. Returns the bound
  // port, or 0 when the address cannot be bound (error() says why).
  int Start(const std::string& address, int max_receive_bytes, int max_send_bytes, const TlsConfig& tls);
  // New RPCs are answered UNAVAILABLE from now on; running ones go on.
  void Refuse() { refusing_.store(true); }
  // Stops the server: RPCs still running after `grace_s` seconds are cancelled; blocks until every
  // RPC has finished. Idempotent (later calls wait for the first to end).
  void Shutdown(double grace_s);
  int Active() const { return active_.load(); }
  // RPCs marked with Call::CountUntilDone that are not done yet.
  int Counted() const { return counted_.load(); }
  const std::string& error() const { return error_; }

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;

 private:
  friend class Reactor;
  std::unique_ptr<grpc::Server> server_;
  std::atomic<bool> refusing_{false};
  std::atomic<int> active_{0};
  std::atomic<int> counted_{0};
  friend class Call;
  std::mutex shutdown_mu_;
  bool shut_down_ = false;
  std::string error_;
};

}  // namespace pyserve::grpc_native
