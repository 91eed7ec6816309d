// Runs moe_union.metal's body over its whole grid on the CPU (cpu_shim.h) and writes the output as float32.
// Built by mlxmtp/metal_kernels/logic_check.py with -D: CFG_T CFG_X CFG_W CFG_S (C++ types of the output, x,
// weights, scales), CFG_K CFG_N CFG_P CFG_BITS CFG_GS CFG_SIMDS CFG_COLS CFG_MAX_ROWS (the kernel's template values);
// the .metal file split into kernel_header.inc (MOE_QUANTIZED defined first) and kernel_body.inc.
// Usage: harness DIR  (reads DIR/{x,rows,experts,w,scales,biases}.bin raw, writes DIR/out.bin)
#include <cstdio>
#include <string>

#include "cpu_shim.h"

#include "kernel_header.inc"

template <typename T, int K, int N, int P, int BITS, int GS, int SIMDS, int COLS, int MAX_ROWS, typename XT,
          typename WT, typename ST>
void kernel_thread(const XT* x, const uint* rows, const uint* experts, const WT* w, const ST* scales,
                   const ST* biases, T* out, uint3 threadgroup_position_in_grid, uint thread_index_in_simdgroup,
                   uint simdgroup_index_in_threadgroup) {
  (void)scales;
  (void)biases;
#include "kernel_body.inc"
}

static std::vector<char> slurp(const std::string& path) {
  std::vector<char> data;
  if (FILE* f = std::fopen(path.c_str(), "rb")) {
    char buf[1 << 16];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) data.insert(data.end(), buf, buf + n);
    std::fclose(f);
  }
  return data;
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: harness DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  auto x = slurp(dir + "/x.bin"), rows = slurp(dir + "/rows.bin"), experts = slurp(dir + "/experts.bin");
  auto w = slurp(dir + "/w.bin"), scales = slurp(dir + "/scales.bin"), biases = slurp(dir + "/biases.bin");
  std::vector<CFG_T> out(size_t(CFG_P) * CFG_N, CFG_T(0.0f));
  const uint tiles = (CFG_N + CFG_SIMDS * CFG_COLS - 1) / (CFG_SIMDS * CFG_COLS);
  shim::run_grid(uint3{tiles, uint(CFG_P), 1}, CFG_SIMDS, [&](uint3 tg, uint lane, uint sg) {
    kernel_thread<CFG_T, CFG_K, CFG_N, CFG_P, CFG_BITS, CFG_GS, CFG_SIMDS, CFG_COLS, CFG_MAX_ROWS>(
        reinterpret_cast<const CFG_X*>(x.data()), reinterpret_cast<const uint*>(rows.data()),
        reinterpret_cast<const uint*>(experts.data()), reinterpret_cast<const CFG_W*>(w.data()),
        reinterpret_cast<const CFG_S*>(scales.data()), reinterpret_cast<const CFG_S*>(biases.data()), out.data(),
        tg, lane, sg);
  });
  std::vector<float> out_f(out.begin(), out.end());
  FILE* f = std::fopen((dir + "/out.bin").c_str(), "wb");
  if (!f || std::fwrite(out_f.data(), sizeof(float), out_f.size(), f) != out_f.size()) return 1;
  std::fclose(f);
  return 0;
}
