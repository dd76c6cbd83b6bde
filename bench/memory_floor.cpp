// What the pass counts of docs/performance.md ("LAMB") cost on this machine: plain loops over
// one fp32 tensor of a BERT word embedding's size (30522 x 768) on one core, no torch.
//
//     g++ -O3 -march=native -ffast-math -o /tmp/memory_floor bench/memory_floor.cpp && /tmp/memory_floor
//
// (-ffast-math lets the sums of squares use vector lanes, as the kernel's do.)
//
// - adamw: AdamW's step, one pass (reads w, g, m, v; writes w, m, v).
// - lamb, u made again: pass 1 reads w, g, m, v, writes m, v; pass 2 reads w, m, v, writes w.
// - lamb, u in g: pass 1 reads w, g, m, v, writes m, v and u over g; pass 2 reads u, w, writes w
//   (what liblars's fused LAMB does in fp32 and fp64).
// - the copies: the same reads and writes with one add per element, the floor of each layout.
// Both LAMB layouts move 10 tensors' worth against AdamW's 7, yet a write-back of a line just
// read costs far less than a read, so the read-heavy second pass of "u made again" costs more.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

double median_ms(void (*step)(long, float*, float*, float*, float*), long n, float* w, float* g, float* m,
                 float* v) {
  std::vector<double> times;
  for (int round = 0; round < 11; ++round) {
    const auto start = std::chrono::steady_clock::now();
    step(n, w, g, m, v);
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

constexpr float kB1 = 0.9f, kB2 = 0.999f, kEps = 1e-6f, kDecay = 0.01f, kLr = 1e-3f;
volatile float sink;

void adamw(long n, float* w, float* g, float* m, float* v) {
  for (long i = 0; i < n; ++i) {
    m[i] = kB1 * m[i] + (1 - kB1) * g[i];
    v[i] = kB2 * v[i] + (1 - kB2) * g[i] * g[i];
    w[i] -= kLr * (m[i] / (std::sqrt(v[i]) + kEps) + kDecay * w[i]);
  }
}

void lamb_recompute(long n, float* w, float* g, float* m, float* v) {
  float ww = 0, uu = 0;
  for (long i = 0; i < n; ++i) {
    m[i] = kB1 * m[i] + (1 - kB1) * g[i];
    v[i] = kB2 * v[i] + (1 - kB2) * g[i] * g[i];
    const float u = m[i] / (std::sqrt(v[i]) + kEps) + kDecay * w[i];
    ww += w[i] * w[i];
    uu += u * u;
  }
  const float step = kLr * std::sqrt(ww) / std::sqrt(uu);
  for (long i = 0; i < n; ++i) {
    w[i] -= step * (m[i] / (std::sqrt(v[i]) + kEps) + kDecay * w[i]);
  }
}

void lamb_u_in_g(long n, float* w, float* g, float* m, float* v) {
  float ww = 0, uu = 0;
  for (long i = 0; i < n; ++i) {
    m[i] = kB1 * m[i] + (1 - kB1) * g[i];
    v[i] = kB2 * v[i] + (1 - kB2) * g[i] * g[i];
    g[i] = m[i] / (std::sqrt(v[i]) + kEps) + kDecay * w[i];
    ww += w[i] * w[i];
    uu += g[i] * g[i];
  }
  const float step = kLr * std::sqrt(ww) / std::sqrt(uu);
  for (long i = 0; i < n; ++i) {
    w[i] -= step * g[i];
  }
}

void copy_adamw(long n, float* w, float* g, float* m, float* v) {
  for (long i = 0; i < n; ++i) {
    const float x = w[i] + g[i] + m[i] + v[i];
    m[i] = x;
    v[i] = x;
    w[i] = x;
  }
}

void copy_lamb_recompute(long n, float* w, float* g, float* m, float* v) {
  float s = 0;
  for (long i = 0; i < n; ++i) {
    const float x = w[i] + g[i] + m[i] + v[i];
    m[i] = x;
    v[i] = x;
    s += w[i];
  }
  for (long i = 0; i < n; ++i) {
    w[i] = m[i] + v[i] + w[i] * s;
  }
}

void copy_lamb_u_in_g(long n, float* w, float* g, float* m, float* v) {
  float s = 0;
  for (long i = 0; i < n; ++i) {
    const float x = w[i] + g[i] + m[i] + v[i];
    m[i] = x;
    v[i] = x;
    g[i] = x;
    s += w[i];
  }
  for (long i = 0; i < n; ++i) {
    w[i] = g[i] + w[i] * s;
  }
}

} // namespace

int main(int argc, char** argv) {
  const long n = argc > 1 ? std::atol(argv[1]) : 30522L * 768;
  std::vector<float> w(n, 0.5f), g(n, 1e-3f), m(n, 1e-3f), v(n, 1e-6f);
  const auto time = [&](auto step) {
    // Values reset outside the timing: the copies make them grow.
    std::fill(w.begin(), w.end(), 0.5f);
    std::fill(g.begin(), g.end(), 1e-3f);
    std::fill(m.begin(), m.end(), 1e-3f);
    std::fill(v.begin(), v.end(), 1e-6f);
    return median_ms(step, n, w.data(), g.data(), m.data(), v.data());
  };
  const double a = time(adamw), lr = time(lamb_recompute), lg = time(lamb_u_in_g);
  const double ca = time(copy_adamw), cr = time(copy_lamb_recompute), cg = time(copy_lamb_u_in_g);
  sink = w[0];
  std::printf("%ld fp32 elements, one core, medians of 11\n", n);
  std::printf("| loop | maths | copies only |\n|---|---:|---:|\n");
  std::printf("| AdamW | %.1f ms, 1.00x | %.1f ms, 1.00x |\n", a, ca);
  std::printf("| LAMB, u made again | %.1f ms, %.2fx | %.1f ms, %.2fx |\n", lr, lr / a, cr, cr / ca);
  std::printf("| LAMB, u in g | %.1f ms, %.2fx | %.1f ms, %.2fx |\n", lg, lg / a, cg, cg / ca);
  return 0;
}
