// Three grpc++ server designs for the native engine's transport, with no Python and no model: each
// answers every RPC with the same canned bytes. Built and driven by transport_designs.py.
//
//   transport_designs MODE PORT THREADS
//
// MODE:
//   callback_inline  CallbackGenericService; the reactor answers in OnReadDone (grpc++'s own threads)
//   callback_handoff CallbackGenericService; OnReadDone posts the RPC to a queue that THREADS worker
//                    threads pop, and the worker answers (pyserve's native transport until 2026-12-01)
//   cq               AsyncGenericService on one completion queue that THREADS threads poll; the
//                    thread that completed an RPC's read answers it (pyserve's native transport now)
// Prints "ready PORT" once serving; runs until killed.
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <functional>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

const std::string kResponse(64, 'x');  // about the size of LeNet's serialized ModelInferResponse
std::string g_mode;

grpc::ByteBuffer Response() {
  grpc::Slice slice(kResponse.data(), kResponse.size());
  return grpc::ByteBuffer(&slice, 1);
}

class WorkQueue {
 public:
  void Push(std::function<void()> f) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      q_.push_back(std::move(f));
    }
    cv_.notify_one();
  }
  std::function<void()> Pop() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [this] { return !q_.empty(); });
    auto f = std::move(q_.front());
    q_.pop_front();
    return f;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
};
WorkQueue g_work;

class Reactor final : public grpc::ServerGenericBidiReactor {
 public:
  Reactor() { StartRead(&in_); }
  void OnReadDone(bool) override {
    if (g_mode == "callback_inline") {
      Answer();
    } else {
      g_work.Push([this] { Answer(); });
    }
  }
  void OnDone() override { delete this; }

 private:
  void Answer() {
    out_ = Response();
    StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
  }
  grpc::ByteBuffer in_, out_;
};

class CallbackService final : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override { return new Reactor; }
};

struct CqCall {
  enum Step { kRequested, kRead, kFinished } step = kRequested;
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream{&ctx};
  grpc::ByteBuffer in, out;
};

void RequestOne(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* cq) {
  auto* call = new CqCall;
  service->RequestCall(&call->ctx, &call->stream, cq, cq, call);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: transport_designs callback_inline|callback_handoff|cq PORT THREADS\n";
    return 2;
  }
  g_mode = argv[1];
  const int threads = std::atoi(argv[3]);
  if ((g_mode != "callback_inline" && g_mode != "callback_handoff" && g_mode != "cq") || threads < 1) {
    std::cerr << "bad MODE or THREADS\n";
    return 2;
  }
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(std::string("127.0.0.1:") + argv[2], grpc::InsecureServerCredentials(), &port);
  CallbackService callback_service;
  grpc::AsyncGenericService async_service;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  if (g_mode == "cq") {
    builder.RegisterAsyncGenericService(&async_service);
    cq = builder.AddCompletionQueue(true);
  } else {
    builder.RegisterCallbackGenericService(&callback_service);
  }
  auto server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::cerr << "cannot bind port " << argv[2] << "\n";
    return 1;
  }
  std::vector<std::thread> pool;
  if (g_mode == "callback_handoff") {
    for (int i = 0; i < threads; ++i) pool.emplace_back([] {
        for (;;) g_work.Pop()();
      });
  } else if (g_mode == "cq") {
    for (int i = 0; i < threads + 4; ++i) RequestOne(&async_service, cq.get());
    for (int i = 0; i < threads; ++i) pool.emplace_back([&] {
        void* tag;
        bool ok;
        while (cq->Next(&tag, &ok)) {
          auto* call = static_cast<CqCall*>(tag);
          if (call->step == CqCall::kRequested) {
            if (!ok) {
              delete call;
              continue;
            }
            RequestOne(&async_service, cq.get());
            call->step = CqCall::kRead;
            call->stream.Read(&call->in, call);
          } else if (call->step == CqCall::kRead) {
            call->step = CqCall::kFinished;
            call->out = Response();
            call->stream.WriteAndFinish(call->out, grpc::WriteOptions(), grpc::Status::OK, call);
          } else {
            delete call;
          }
        }
      });
  }
  std::cout << "ready " << port << std::endl;
  server->Wait();
  return 0;
}
