// See transport.h.
#include "grpc_native/transport.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

namespace pyserve::grpc_native {

// ---- one RPC's grpc++ objects ------------------------------------------------------------------
enum class OpKind : int { kRequest, kFirst, kRead, kWrite, kMeta, kFinish, kDone, kCount };

// The completion-queue tag of one kind of operation of one RPC (at most one of each is pending).
struct Op {
  Rpc* rpc;
  OpKind kind;
};

// Owned by the Transport from RequestOne until Complete (or a failed request). The fields below
// `call` are guarded by call->mu_.
class Rpc {
 public:
  explicit Rpc(Transport* transport) : transport(transport), call(std::make_shared<Call>()) {
    for (int i = 0; i < static_cast<int>(OpKind::kCount); ++i) ops[i] = Op{this, static_cast<OpKind>(i)};
  }
  Op* op(OpKind kind) { return &ops[static_cast<int>(kind)]; }
  // Complete when grpc++ is done with the RPC, its handler has finished it and no operation is
  // pending (a handler must call Finish even on a cancelled RPC; module.cpp makes sure it does).
  bool Over() const { return done_seen && finish_started && pending == 0; }

  Transport* transport;
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream{&ctx};
  std::shared_ptr<Call> call;
  Op ops[static_cast<int>(OpKind::kCount)];
  int pending = 0;             // operations started and not completed
  bool finish_started = false;
  bool done_seen = false;      // grpc++'s done notification came
  bool started = false;        // the first read completed: the RPC went (or waits) to a handler
};

// ---- Call ------------------------------------------------------------------------------------
bool Call::Read(grpc::ByteBuffer* out) {
  std::unique_lock<std::mutex> lk(mu_);
  if (rpc_ == nullptr || cancelled_.load() || finished_.load()) return false;
  read_done_ = false;
  rpc_->pending++;
  rpc_->stream.Read(&read_buf_, rpc_->op(OpKind::kRead));  // completes (ok or not) on a polling thread
  cv_.wait(lk, [this] { return read_done_; });
  if (!read_ok_) return false;
  out->Swap(&read_buf_);
  read_buf_.Clear();
  return true;
}

bool Call::Write(const char* data, size_t size) {
  std::unique_lock<std::mutex> lk(mu_);
  if (rpc_ == nullptr || cancelled_.load() || finished_.load()) return false;
  write_done_ = false;
  grpc::Slice slice(data, size);
  write_buf_ = grpc::ByteBuffer(&slice, 1);
  rpc_->pending++;
  rpc_->stream.Write(write_buf_, rpc_->op(OpKind::kWrite));
  cv_.wait(lk, [this] { return write_done_; });
  return write_ok_;
}

void Call::SendInitialMetadata(const Metadata& md, bool send_now) {
  std::unique_lock<std::mutex> lk(mu_);
  if (rpc_ == nullptr || finished_.load()) return;
  for (const auto& kv : md) rpc_->ctx.AddInitialMetadata(kv.first, kv.second);
  if (!send_now) return;
  meta_done_ = false;
  rpc_->pending++;
  rpc_->stream.SendInitialMetadata(rpc_->op(OpKind::kMeta));
  cv_.wait(lk, [this] { return meta_done_; });  // one at a time: a Write must not overlap it
}

bool Call::Finish(int code, const std::string& details, const char* response, size_t response_size,
                  bool with_response, const Metadata& trailing) {
  std::lock_guard<std::mutex> lk(mu_);
  if (finished_.exchange(true) || rpc_ == nullptr) return false;
  Rpc* rpc = rpc_;
  for (const auto& kv : trailing) rpc->ctx.AddTrailingMetadata(kv.first, kv.second);
  grpc::Status status(static_cast<grpc::StatusCode>(code), details);
  rpc->finish_started = true;
  rpc->pending++;
  if (with_response && code == 0) {
    grpc::Slice slice(response, response_size);
    last_buf_ = grpc::ByteBuffer(&slice, 1);
    rpc->stream.WriteAndFinish(last_buf_, grpc::WriteOptions(), status, rpc->op(OpKind::kFinish));
  } else {
    rpc->stream.Finish(status, rpc->op(OpKind::kFinish));
  }
  return true;
}

void* Call::ExchangeUser(void* user) {
  std::lock_guard<std::mutex> lk(mu_);
  void* old = user_;
  user_ = user;
  return old;
}

void Call::CountUntilDone() {
  std::lock_guard<std::mutex> lk(mu_);  // against Complete: counted only while not done
  if (done_ || counted_.exchange(true)) return;
  transport_->counted_.fetch_add(1);
}

void Call::Cancel() {
  std::lock_guard<std::mutex> lk(mu_);
  if (rpc_ != nullptr && !done_) rpc_->ctx.TryCancel();
}

// ---- TaskQueue -------------------------------------------------------------------------------
void TaskQueue::Push(Task task) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    tasks_.push_back(std::move(task));
  }
  cv_.notify_one();
}

bool TaskQueue::Pop(Task* out) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [this] { return closed_ || !tasks_.empty(); });
  if (tasks_.empty()) return false;
  *out = std::move(tasks_.front());
  tasks_.pop_front();
  return true;
}

void TaskQueue::Close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

// ---- Transport -------------------------------------------------------------------------------
Transport::~Transport() {
  if (cq_ && !server_) {  // Start failed after the queue was made: drain it here
    cq_->Shutdown();
    void* tag;
    bool ok;
    while (cq_->Next(&tag, &ok)) {
    }
  }
}

void Transport::RequestOne() {
  auto* rpc = new Rpc(this);
  rpc->ctx.AsyncNotifyWhenDone(rpc->op(OpKind::kDone));
  service_.RequestCall(&rpc->ctx, &rpc->stream, cq_.get(), cq_.get(), rpc->op(OpKind::kRequest));
}

void Transport::Complete(Rpc* rpc) {
  Call& c = *rpc->call;
  bool notify;
  {
    std::lock_guard<std::mutex> lk(c.mu_);
    c.done_ = true;
    c.rpc_ = nullptr;
    notify = rpc->started && c.user_ != nullptr;
    c.cv_.notify_all();
  }
  if (c.counted_.load()) counted_.fetch_sub(1);
  if (notify) ends.Push(Task{TaskKind::kDone, rpc->call});
  delete rpc;
  {
    std::lock_guard<std::mutex> lk(active_mu_);
    active_.fetch_sub(1);
  }
  active_cv_.notify_all();
}

void Transport::Handle(void* tag, bool ok, std::shared_ptr<Call>* start) {
  Op* op = static_cast<Op*>(tag);
  Rpc* rpc = op->rpc;
  Call& c = *rpc->call;
  bool over = false;
  switch (op->kind) {
    case OpKind::kRequest: {
      if (!ok) {  // shutting down before an RPC came; grpc++ sends no done notification then
        delete rpc;
        return;
      }
      active_.fetch_add(1);
      if (accepting_.load()) RequestOne();  // keep the number of waiting slots
      c.method = rpc->ctx.method();
      c.peer = rpc->ctx.peer();
      for (const auto& kv : rpc->ctx.client_metadata()) {
        c.metadata.emplace_back(std::string(kv.first.data(), kv.first.size()),
                                std::string(kv.second.data(), kv.second.size()));
      }
      const auto deadline = rpc->ctx.deadline();
      if (deadline >= std::chrono::system_clock::now() + std::chrono::hours(24 * 365 * 100)) {
        c.deadline_s = std::numeric_limits<double>::infinity();
      } else {
        c.deadline_s = std::chrono::duration<double>(deadline.time_since_epoch()).count();
      }
      c.transport_ = this;
      std::lock_guard<std::mutex> lk(c.mu_);
      c.rpc_ = rpc;
      rpc->pending++;
      if (refusing_.load()) {
        c.finished_.store(true);
        rpc->finish_started = true;
        rpc->stream.Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"),
                           rpc->op(OpKind::kFinish));
      } else {
        rpc->stream.Read(&c.first, rpc->op(OpKind::kFirst));
      }
      return;
    }
    case OpKind::kFirst: {
      std::lock_guard<std::mutex> lk(c.mu_);
      rpc->pending--;
      rpc->started = true;
      c.has_first = ok;
      *start = rpc->call;  // not Over: its handler has yet to finish it
      return;
    }
    case OpKind::kRead:
    case OpKind::kWrite:
    case OpKind::kMeta:
    case OpKind::kFinish: {
      std::lock_guard<std::mutex> lk(c.mu_);
      rpc->pending--;
      if (op->kind == OpKind::kRead) {
        c.read_ok_ = ok;
        c.read_done_ = true;
      } else if (op->kind == OpKind::kWrite) {
        c.write_ok_ = ok;
        c.write_done_ = true;
      } else if (op->kind == OpKind::kMeta) {
        c.meta_done_ = true;
      }
      c.cv_.notify_all();
      over = rpc->Over();
      break;
    }
    case OpKind::kDone: {
      std::shared_ptr<Call> cancelled;  // taken under the lock: once it is released, another thread
      {                                 // may complete the last operation and delete `rpc`
        std::lock_guard<std::mutex> lk(c.mu_);
        rpc->done_seen = true;
        if (rpc->ctx.IsCancelled()) {
          c.cancelled_.store(true);
          if (rpc->started && c.user_ != nullptr) cancelled = rpc->call;
        }
        c.cv_.notify_all();
        over = rpc->Over();
      }
      if (cancelled) ends.Push(Task{TaskKind::kCancel, std::move(cancelled)});
      break;
    }
    case OpKind::kCount:
      return;
  }
  if (over) Complete(rpc);
}

void Transport::ReleaseSlot() {
  std::lock_guard<std::mutex> lk(run_mu_);
  --busy_;
}

void Transport::RetakeSlot() {
  std::lock_guard<std::mutex> lk(run_mu_);
  ++busy_;  // may pass workers_ for a moment if another RPC took the slot meanwhile
}

bool Transport::NextCall(std::shared_ptr<Call>* out, bool handled_one) {
  {
    std::lock_guard<std::mutex> lk(run_mu_);
    if (handled_one) --busy_;
    if (!waiting_.empty() && busy_ < workers_) {  // a slot is free (a handler ended, a stream let go)
      ++busy_;
      *out = std::move(waiting_.front());
      waiting_.pop_front();
      return true;
    }
  }
  void* tag;
  bool ok;
  while (cq_->Next(&tag, &ok)) {
    std::shared_ptr<Call> start;
    Handle(tag, ok, &start);
    if (!start) continue;
    std::lock_guard<std::mutex> lk(run_mu_);
    if (busy_ < workers_) {
      ++busy_;
      *out = std::move(start);
      return true;
    }
    waiting_.push_back(std::move(start));
  }
  return false;
}

int Transport::Start(const std::string& address, int max_receive_bytes, int max_send_bytes,
                     const TlsConfig& tls) {
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds;
  if (tls.enabled) {
    grpc::SslServerCredentialsOptions opts(
        tls.client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                              : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    opts.pem_root_certs = tls.client_ca;
    opts.pem_key_cert_pairs.push_back({tls.private_key, tls.cert_chain});
    creds = grpc::SslServerCredentials(opts);
  } else {
    creds = grpc::InsecureServerCredentials();
  }
  int port = 0;
  builder.AddListeningPort(address, creds, &port);
  builder.SetMaxReceiveMessageSize(max_receive_bytes);
  builder.SetMaxSendMessageSize(max_send_bytes);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // grpc++ 1.51's 8 KiB default for a request's metadata is easy to pass with a long bearer or
  // tracing header, and passing it fails every call on that connection, not just the one: 64 KiB
  builder.AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE, 64 * 1024);
  builder.RegisterAsyncGenericService(&service_);
  cq_ = builder.AddCompletionQueue(true);
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) {
    error_ = "grpc++ could not bind " + address;
    server_.reset();
    return 0;
  }
  accepting_.store(true);
  for (int i = 0; i < std::max(8, workers_ + 1); ++i) RequestOne();
  return port;
}

void Transport::Shutdown(double grace_s) {
  std::lock_guard<std::mutex> lk(shutdown_mu_);
  if (shut_down_ || !server_) return;
  refusing_.store(true);
  accepting_.store(false);
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::microseconds(static_cast<int64_t>(std::max(0.0, grace_s) * 1e6));
  server_->Shutdown(deadline);  // cancels what still runs at the deadline
  server_->Wait();
  {  // every RPC's handler has finished it and grpc++ is done with it: no operation can start now
    std::unique_lock<std::mutex> alk(active_mu_);
    active_cv_.wait(alk, [this] { return active_.load() == 0; });
  }
  cq_->Shutdown();  // the NextCall threads drain it and return false
  shut_down_ = true;
}

}  // namespace pyserve::grpc_native
