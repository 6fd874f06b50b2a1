// See transport.h.
#include "grpc_native/transport.h"

#include <chrono>
#include <cmath>
#include <limits>

namespace pyserve::grpc_native {

// ---- the reactor of one RPC ------------------------------------------------------------------
class Reactor final : public grpc::ServerGenericBidiReactor {
 public:
  Reactor(Transport* transport, grpc::GenericCallbackServerContext* ctx)
      : transport_(transport), call_(std::make_shared<Call>()) {
    transport_->active_.fetch_add(1);
    Call& c = *call_;
    c.method = ctx->method();
    c.peer = ctx->peer();
    for (const auto& kv : ctx->client_metadata()) {
      c.metadata.emplace_back(std::string(kv.first.data(), kv.first.size()),
                              std::string(kv.second.data(), kv.second.size()));
    }
    const auto deadline = ctx->deadline();
    const auto now = std::chrono::system_clock::now();
    if (deadline >= now + std::chrono::hours(24 * 365 * 100)) {
      c.deadline_s = std::numeric_limits<double>::infinity();
    } else {
      c.deadline_s = std::chrono::duration<double>(deadline.time_since_epoch()).count();
    }
    c.reactor_ = this;
    c.ctx_ = ctx;
    c.transport_ = transport_;
    if (transport_->refusing_.load()) {
      c.finished_.store(true);
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
      return;
    }
    StartRead(&c.first);
  }

  void OnReadDone(bool ok) override {
    Call& c = *call_;
    std::unique_lock<std::mutex> lk(c.mu_);
    if (!c.started_) {
      c.started_ = true;
      c.has_first = ok;
      lk.unlock();
      transport_->calls.Push(Task{TaskKind::kStart, call_});
      return;
    }
    c.read_ok_ = ok;
    c.read_done_ = true;
    c.cv_.notify_all();
  }

  void OnWriteDone(bool ok) override {
    Call& c = *call_;
    std::lock_guard<std::mutex> lk(c.mu_);
    c.write_ok_ = ok;
    c.write_done_ = true;
    c.cv_.notify_all();
  }

  void OnCancel() override {
    Call& c = *call_;
    c.cancelled_.store(true);
    bool notify;
    {
      std::lock_guard<std::mutex> lk(c.mu_);
      notify = c.started_ && c.user_ != nullptr;
      c.cv_.notify_all();
    }
    if (notify) transport_->ends.Push(Task{TaskKind::kCancel, call_});
  }

  void OnDone() override {
    Call& c = *call_;
    bool notify;
    {
      std::lock_guard<std::mutex> lk(c.mu_);
      c.done_ = true;
      c.reactor_ = nullptr;
      c.ctx_ = nullptr;
      notify = c.started_ && c.user_ != nullptr;
      c.cv_.notify_all();
    }
    if (c.counted_.load()) transport_->counted_.fetch_sub(1);
    if (notify) transport_->ends.Push(Task{TaskKind::kDone, std::move(call_)});
    transport_->active_.fetch_sub(1);
    delete this;
  }

 private:
  Transport* transport_;
  std::shared_ptr<Call> call_;
};

// ---- Call ------------------------------------------------------------------------------------
bool Call::Read(grpc::ByteBuffer* out) {
  Reactor* reactor;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (reactor_ == nullptr || cancelled_.load() || finished_.load()) return false;
    reactor = reactor_;
    read_done_ = false;
  }
  reactor->StartRead(&read_buf_);  // reactor_ lives until Finish, which only this thread calls
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [this] { return read_done_; });
  if (!read_ok_) return false;
  out->Swap(&read_buf_);
  read_buf_.Clear();
  return true;
}

bool Call::Write(const char* data, size_t size) {
  Reactor* reactor;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (reactor_ == nullptr || cancelled_.load() || finished_.load()) return false;
    reactor = reactor_;
    write_done_ = false;
    grpc::Slice slice(data, size);
    write_buf_ = grpc::ByteBuffer(&slice, 1);
  }
  reactor->StartWrite(&write_buf_);
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [this] { return write_done_; });
  return write_ok_;
}

void Call::SendInitialMetadata(const Metadata& md, bool send_now) {
  Reactor* reactor;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (reactor_ == nullptr || finished_.load()) return;
    for (const auto& kv : md) ctx_->AddInitialMetadata(kv.first, kv.second);
    reactor = reactor_;
  }
  if (send_now) reactor->StartSendInitialMetadata();
}

bool Call::Finish(int code, const std::string& details, const char* response, size_t response_size,
                  bool with_response, const Metadata& trailing) {
  Reactor* reactor;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (finished_.exchange(true) || reactor_ == nullptr) return false;
    reactor = reactor_;
    for (const auto& kv : trailing) ctx_->AddTrailingMetadata(kv.first, kv.second);
    if (with_response) {
      grpc::Slice slice(response, response_size);
      last_buf_ = grpc::ByteBuffer(&slice, 1);
    }
  }
  grpc::Status status(static_cast<grpc::StatusCode>(code), details);
  if (with_response && code == 0) {
    reactor->StartWriteAndFinish(&last_buf_, grpc::WriteOptions(), status);
  } else {
    reactor->Finish(status);
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
  std::lock_guard<std::mutex> lk(mu_);  // against OnDone: counted only while not done
  if (done_ || counted_.exchange(true)) return;
  transport_->counted_.fetch_add(1);
}

void Call::Cancel() {
  std::lock_guard<std::mutex> lk(mu_);
  if (ctx_ != nullptr && !done_) ctx_->TryCancel();
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
grpc::ServerGenericBidiReactor* Transport::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new Reactor(this, ctx);
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
  builder.RegisterCallbackGenericService(this);
  server_ = builder.BuildAndStart();
  if (!server_ || port == 0) {
    error_ = "grpc++ could not bind " + address;
    server_.reset();
    return 0;
  }
  return port;
}

void Transport::Shutdown(double grace_s) {
  std::lock_guard<std::mutex> lk(shutdown_mu_);
  if (shut_down_ || !server_) return;
  refusing_.store(true);
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::microseconds(static_cast<int64_t>(std::max(0.0, grace_s) * 1e6));
  server_->Shutdown(deadline);  // cancels what still runs at the deadline; waits for every reactor
  server_->Wait();
  shut_down_ = true;
}

}  // namespace pyserve::grpc_native
