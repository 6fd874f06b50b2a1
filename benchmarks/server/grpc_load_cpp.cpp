// A closed-loop ModelInfer load generator in C++ (grpc++ callback API): the lighter client of
// benchmarks/server/bench_server.py's pyserve-vs-KServe comparison (--vs-client cpp).
//
//   g++ -O2 -std=c++17 benchmarks/server/grpc_load_cpp.cpp -o build/grpc_load_cpp $(pkg-config --cflags --libs grpc++)
//   build/grpc_load_cpp --url 127.0.0.1:8001 --request req.bin --concurrency 4 --seconds 3 [--warmup 50]
//
// `--request` is one serialized inference.ModelInferRequest (bench_server.py writes it with
// grpc_load.py's request_bytes); it is sent as raw bytes and the answers are not parsed, as
// grpc_load.py does, but without Python: perf_analyzer cannot drive the KServe Python server (no
// ModelConfig RPC), and grpc_load.py's grpc.aio loop costs ~400 us of client CPU per request on the
// 2-vCPU machine the servers share. `--concurrency` calls are kept in flight, each issuing the next
// one from its completion callback. Prints one JSON line like grpc_load.py's: infer_per_s, p50_us,
// p99_us, requests, errors, client. Exits 1 when a call fails during the warm-up.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
const char* kMethod = "/inference.GRPCInferenceService/ModelInfer";

struct Load {
  grpc::GenericStub* stub;
  grpc::ByteBuffer request;
  std::atomic<bool> stop{false};
  std::atomic<long> errors{0};
  std::mutex mu;
  std::condition_variable cv;
  int running = 0;
  std::vector<double> latencies_us;  // under mu
};

// One in-flight slot: issues a call, and from its completion the next, until Load::stop.
class Slot {
 public:
  explicit Slot(Load* load) : load_(load) {}
  void Issue() {
    ctx_ = std::make_unique<grpc::ClientContext>();
    ctx_->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    response_.Clear();
    t0_ = Clock::now();
    load_->stub->UnaryCall(ctx_.get(), kMethod, grpc::StubOptions(), &load_->request, &response_,
                           [this](grpc::Status status) { Done(status); });
  }

 private:
  void Done(const grpc::Status& status) {
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0_).count();
    if (!status.ok()) load_->errors.fetch_add(1);
    if (!load_->stop.load()) {
      {
        std::lock_guard<std::mutex> lk(load_->mu);
        if (status.ok()) load_->latencies_us.push_back(us);
      }
      Issue();
      return;
    }
    std::lock_guard<std::mutex> lk(load_->mu);
    if (--load_->running == 0) load_->cv.notify_all();
  }

  Load* load_;
  std::unique_ptr<grpc::ClientContext> ctx_;
  grpc::ByteBuffer response_;
  Clock::time_point t0_;
};

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double pos = q / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

int Usage(const char* why) {
  std::fprintf(stderr, "grpc_load_cpp: %s\nusage: grpc_load_cpp --url HOST:PORT --request FILE --concurrency N "
               "--seconds S [--warmup N]\n", why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string url, request_file;
  int concurrency = 1, warmup = 50;
  double seconds = 3.0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--url") url = value;
    else if (key == "--request") request_file = value;
    else if (key == "--concurrency") concurrency = std::atoi(value.c_str());
    else if (key == "--seconds") seconds = std::atof(value.c_str());
    else if (key == "--warmup") warmup = std::atoi(value.c_str());
    else return Usage(("unknown argument " + key).c_str());
  }
  if (url.empty() || request_file.empty()) return Usage("--url and --request are required");
  if (concurrency < 1 || seconds <= 0 || warmup < 0) return Usage("bad --concurrency, --seconds or --warmup");
  std::ifstream in(request_file, std::ios::binary);
  if (!in) return Usage(("cannot read " + request_file).c_str());
  const std::string payload((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());

  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  auto channel = grpc::CreateCustomChannel(url, grpc::InsecureChannelCredentials(), args);
  grpc::GenericStub stub(channel);
  Load load;
  load.stub = &stub;
  grpc::Slice slice(payload);
  load.request = grpc::ByteBuffer(&slice, 1);

  for (int i = 0; i < warmup + 1; ++i) {  // sequential warm-up; the first call also checks the server
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    grpc::ByteBuffer response;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    grpc::Status result;
    stub.UnaryCall(&ctx, kMethod, grpc::StubOptions(), &load.request, &response, [&](grpc::Status status) {
      std::lock_guard<std::mutex> lk(mu);
      result = status;
      done = true;
      cv.notify_all();
    });
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return done; });
    if (!result.ok()) {
      std::fprintf(stderr, "grpc_load_cpp: warm-up call failed: %d %s\n", static_cast<int>(result.error_code()),
                   result.error_message().c_str());
      return 1;
    }
  }

  std::vector<std::unique_ptr<Slot>> slots;
  for (int i = 0; i < concurrency; ++i) slots.push_back(std::make_unique<Slot>(&load));
  load.running = concurrency;
  const auto t0 = Clock::now();
  for (auto& s : slots) s->Issue();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  load.stop.store(true);
  const double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  {
    std::unique_lock<std::mutex> lk(load.mu);
    load.cv.wait(lk, [&] { return load.running == 0; });
  }
  std::vector<double> lat;
  {
    std::lock_guard<std::mutex> lk(load.mu);
    lat = load.latencies_us;
  }
  std::printf("{\"infer_per_s\": %.3f, \"p50_us\": %.3f, \"p99_us\": %.3f, \"requests\": %zu, \"errors\": %ld, "
              "\"client\": \"grpc_load_cpp\"}\n",
              static_cast<double>(lat.size()) / elapsed, Percentile(lat, 50), Percentile(lat, 99), lat.size(),
              load.errors.load());
  return 0;
}
