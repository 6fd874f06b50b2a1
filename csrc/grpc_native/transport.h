// pyserve._grpc_native, transport layer: a grpc++ server with one AsyncGenericService (raw
// ByteBuffers, any method) on one completion queue. No Python here; module.cpp's threads call
// Transport::NextCall and run the RPCs it hands them with the GIL held.
//
// Threads: `workers + 1` threads poll the completion queue (grpc++'s Next: the polling thread reads
// the socket, parses HTTP/2 and completes the operations itself). When a new RPC's first request
// message is in, the thread that completed it returns it from NextCall and runs its handler
// inline, so a unary RPC is read, handled and answered on one thread, without a hand-off. At most
// `workers` threads run handlers at once; an RPC that arrives while all of them are busy waits in
// a FIFO that the next thread to finish a handler takes from. The one thread more than `workers`
// means at least one thread always polls: a handler blocked in Call::Read or Call::Write (streams)
// is woken by an operation another thread completes.
//
// Life of a call: RequestCall completes (the RPC's metadata is in), the first message is read,
// then NextCall hands the call to a handler, which reads further messages with Call::Read, writes
// with Call::Write (both block the calling thread until the operation completes) and ends the RPC
// with Call::Finish exactly once. grpc++'s done notification (end of the RPC, or its cancellation:
// client cancel, deadline, server shutdown) posts kCancel/kDone tasks to the `ends` queue, so that
// end-of-RPC callbacks run even when every handler thread is blocked in a long-lived stream.
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

class Rpc;

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
  // The handler returned without finishing and something else (a future's callback) will: the
  // polling thread must not finish the RPC for it.
  void Defer() { deferred_.store(true); }
  bool Deferred() const { return deferred_.load(); }
  // grpc++ is done with the RPC and it was released (no end notice comes any more).
  bool Done() {
    std::lock_guard<std::mutex> lk(mu_);
    return done_;
  }
  // Blocks until the next request message is in `out` (true) or the stream ended or the call was
  // cancelled or finished (false).
  bool Read(grpc::ByteBuffer* out);
  // Blocks until the message is written (true) or failed (cancelled, finished: false).
  bool Write(const char* data, size_t size);
  // Adds initial metadata; sent with the first message, or now (blocking until sent) when `send_now`.
  void SendInitialMetadata(const Metadata& md, bool send_now);
  // Ends the RPC with a status (code: a grpc_status_code), optional trailing metadata and an
  // optional last message (response != nullptr). Returns false if already finished (a no-op).
  bool Finish(int code, const std::string& details, const char* response, size_t response_size,
              bool with_response, const Metadata& trailing);
  // Server-side cancel (ServerContext::TryCancel).
  void Cancel();

 private:
  friend class Rpc;
  friend class Transport;
  std::mutex mu_;
  std::condition_variable cv_;
  Rpc* rpc_ = nullptr;  // the grpc++ side; nullptr once the RPC is complete (Transport deletes it)
  class Transport* transport_ = nullptr;
  void* user_ = nullptr;
  std::atomic<bool> counted_{false};
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> finished_{false};
  std::atomic<bool> deferred_{false};
  bool done_ = false;
  bool read_done_ = false, read_ok_ = false;
  bool write_done_ = false, write_ok_ = false;
  bool meta_done_ = false;
  grpc::ByteBuffer read_buf_;
  grpc::ByteBuffer write_buf_;
  grpc::ByteBuffer last_buf_;
};

// End-of-RPC notices for the control thread.
enum class TaskKind { kCancel, kDone };

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
class Transport {
 public:
  TaskQueue ends;  // kCancel, kDone

  explicit Transport(int workers) : workers_(workers) {}
  ~Transport();

  // Binds `address` ("host:port"; port 0 = any free port) and starts serving. Returns the bound
  // port, or 0 when the address cannot be bound (error() says why). Then `workers + 1` threads
  // must call NextCall until it returns false.
  int Start(const std::string& address, int max_receive_bytes, int max_send_bytes, const TlsConfig& tls);
  // Polls the completion queue until there is an RPC for this thread to handle (true, in *out) or
  // the server has shut down (false). `handled_one`: this thread has just run a handler (from
  // the previous NextCall), which frees its handler slot.
  bool NextCall(std::shared_ptr<Call>* out, bool handled_one);
  // The calling thread's handler is a stream: its handler slot is released now (a stream may stay
  // open for as long as the client likes), and the caller starts one more polling thread. When the
  // stream's handler returns, its thread leaves (it must not call NextCall with handled_one).
  void ReleaseSlot();
  // Undoes ReleaseSlot when the caller could not start its thread (the stream keeps a slot).
  void RetakeSlot();
  // New RPCs are answered UNAVAILABLE from now on; running ones go on.
  void Refuse() { refusing_.store(true); }
  // Stops the server: RPCs still running after `grace_s` seconds are cancelled; blocks until every
  // RPC has finished (the NextCall threads must go on meanwhile), then ends the completion queue,
  // after which NextCall returns false. Idempotent (later calls wait for the first to end).
  void Shutdown(double grace_s);
  int Active() const { return active_.load(); }
  // RPCs marked with Call::CountUntilDone that are not done yet.
  int Counted() const { return counted_.load(); }
  const std::string& error() const { return error_; }

 private:
  friend class Rpc;
  friend class Call;
  void RequestOne();                 // one more RPC slot on the completion queue
  void Complete(Rpc* rpc);           // the RPC is over: tell the Call, post kDone, delete it
  void Handle(void* tag, bool ok, std::shared_ptr<Call>* start);

  const int workers_;
  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::Server> server_;
  std::atomic<bool> refusing_{false};
  std::atomic<bool> accepting_{false};  // RequestCall may be posted (false from Shutdown on)
  std::atomic<int> active_{0};
  std::atomic<int> counted_{0};
  std::mutex active_mu_;                // with active_cv_: Shutdown waits for active_ == 0
  std::condition_variable active_cv_;
  std::mutex run_mu_;                   // busy_, waiting_
  int busy_ = 0;                        // threads running a handler
  std::deque<std::shared_ptr<Call>> waiting_;  // RPCs ready for a handler while all were busy
  std::mutex shutdown_mu_;
  bool shut_down_ = false;
  std::string error_;
};

}  // namespace pyserve::grpc_native
