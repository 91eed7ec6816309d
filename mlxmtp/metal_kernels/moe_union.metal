// MoE expert dispatch over the union of the routed experts (issue #10; field-notes.md, reason 1).
//
// One launch per projection. The (token, expert) pairs of a small batch arrive sorted by expert: slot p has expert
// experts[p] and input row x[rows[p]]. Threadgroup (tile, p) works only if p starts an expert's segment; it then
// reads its expert's weight rows for the tile's output columns ONCE and applies them to every row of the segment,
// writing out[p .. p+len) in sorted order. Other threadgroups exit at once, so the grid needs no host sync.
//
// Weights: affine-quantized (MLX layout: uint32 words, value i of a word at bits [i*BITS, (i+1)*BITS), scales and
// biases per GS values along K; w = scale * q + bias), BITS in {2, 4, 8}, or float T (fp32 / fp16 / bf16).
// Each simdgroup owns COLS output columns; its 32 lanes split K in chunks of 8 values and reduce with simd_sum
// (the lane layout of MLX's qmv). Accumulation is in float.
//
// The file is the kernel's header, then the body after the marker line below (mx.fast.metal_kernel writes the
// signature). It is also compiled as C++ by metal_kernels/logic_check (cpu_shim.h maps the Metal names).
// Template parameters: T, K (input dim), N (output dim), P (slots), BITS, GS, SIMDS (simdgroups per threadgroup),
// COLS, MAX_ROWS (rows held in registers at once; longer segments loop). MOE_QUANTIZED selects the weight format.

template <int BITS, int GS, int K, typename WP, typename SP>
inline void load_chunk_quantized(thread float* wv, WP w, SP scales, SP biases, ulong row, uint k) {
  constexpr uint per_word = 32 / BITS;
  constexpr uint mask = (1u << BITS) - 1u;
  const auto wr = w + row * (K / per_word);
  const float s = float(scales[row * (K / GS) + k / GS]);
  const float b = float(biases[row * (K / GS) + k / GS]);
  for (uint i = 0; i < 8; i++) {
    const uint kk = k + i;
    const uint q = (wr[kk / per_word] >> ((kk % per_word) * BITS)) & mask;
    wv[i] = s * float(q) + b;
  }
}

template <int K, typename WP>
inline void load_chunk_float(thread float* wv, WP w, ulong row, uint k) {
  const auto wr = w + row * K + k;
  for (uint i = 0; i < 8; i++) {
    wv[i] = float(wr[i]);
  }
}

// ---- body ----
const uint p = threadgroup_position_in_grid.y;
const uint e = experts[p];
if (p > 0 && experts[p - 1] == e) {
  return;  // not the first slot of this expert's segment: the segment's first threadgroup does its rows
}
uint len = 1;
while (p + len < P && experts[p + len] == e) {
  len++;
}
const uint lane = thread_index_in_simdgroup;
const uint n0 = (threadgroup_position_in_grid.x * SIMDS + simdgroup_index_in_threadgroup) * COLS;
for (uint base = 0; base < len; base += MAX_ROWS) {
  const uint nr = (len - base < MAX_ROWS) ? (len - base) : MAX_ROWS;
  float acc[MAX_ROWS][COLS];
  for (uint r = 0; r < MAX_ROWS; r++) {
    for (uint c = 0; c < COLS; c++) {
      acc[r][c] = 0.0f;
    }
  }
  for (uint c = 0; c < COLS; c++) {
    const uint n = n0 + c;
    if (n >= N) {
      break;  // uniform across the simdgroup
    }
    const ulong wrow = ulong(e) * N + n;
    for (uint k = lane * 8; k < K; k += 32 * 8) {
      float wv[8];
#if MOE_QUANTIZED
      load_chunk_quantized<BITS, GS, K>(wv, w, scales, biases, wrow, k);
#else
      load_chunk_float<K>(wv, w, wrow, k);
#endif
      for (uint r = 0; r < MAX_ROWS; r++) {
        if (r < nr) {
          const auto xr = x + ulong(rows[p + base + r]) * K + k;
          float s = 0.0f;
          for (uint i = 0; i < 8; i++) {
            s += wv[i] * float(xr[i]);
          }
          acc[r][c] += s;
        }
      }
    }
  }
  for (uint r = 0; r < MAX_ROWS; r++) {
    if (r < nr) {
      for (uint c = 0; c < COLS; c++) {
        const float v = simd_sum(acc[r][c]);
        if (lane == 0 && n0 + c < N) {
          out[ulong(p + base + r) * N + n0 + c] = static_cast<T>(v);
        }
      }
    }
  }
}
