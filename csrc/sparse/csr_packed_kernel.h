// Prepared ("packed") CSR weight for y = x @ W.T + bias: layout, packing and the CPU kernels.
// Framework-free: raw pointers and std::vector only.
//
// Layout: SELL-C-sigma with C = 8 (Kreutzer, Hager, Wellein, Fehske, Bishop, "A unified sparse
// matrix data format for efficient general sparse matrix-vector multiplication on modern processors
// with wide SIMD units", SIAM J. Sci. Comput. 36(5), 2014, section 2):
//   * the N rows of W [N, K] are cut into slices of 8 consecutive rows (the last slice padded with
//     empty lanes). With sorted rows, rows are first sorted by length (descending, stable) inside
//     windows of sigma = 64 rows, so that the rows of a slice have similar lengths (their section
//     2.2); sort_rows < 0 (auto) sorts when natural slices would pad the entries by more than 5%
//     (every BERT-shaped layer at >= 90% sparsity), else keeps the natural order;
//   * slice s stores width[s] = (longest row of the slice) "columns" of 8 entries, column-major:
//     entry j of lane r sits at slice_ptr[s] + 8 * j + r; a lane shorter than the width is padded
//     with value 0 and column index 0 (padding is never read as data: see the kernels);
//   * column indices are uint16 when K <= 65536 (index_bits = 16: 6 bytes per nonzero instead of
//     CSR's 8), else int32 (index_bits = 32); values fp32;
//   * row_len [8 S] and row_of [8 S] give each lane's true length and its output row (-1 for the
//     padding lanes past N); pos_of [N] is the inverse (the lane of each row); slice_min [S] is the
//     shortest lane of the slice.
// Packing validates nothing: the launcher has checked the CSR structure (indptr monotone, every
// column index in [0, K) and strictly increasing within its row) before calling csr_pack, so the
// kernels run without any per-call index check.
//
// Kernels (OpenMP over groups of slices, GIL released by the caller):
//   * B == 1 (SpMV): the 8 lanes of a slice are the 8 lanes of one AVX2 register: for each column j
//     of the slice, one 8-wide value load, 8 scalar x loads through the indices assembled into a
//     vector (faster than vgatherdps on Zen 3), and one FMA, with no per-row loop, branch, tail or
//     horizontal sum. Columns past the slice's shortest lane mask the x of lanes whose row has
//     ended (they add 0 * 0). The 8 sums go to y[row_of[r]] (one vector store in natural order).
//   * B > 1 (SpMM): x is transposed once into xt [K, Bp] (Bp = B rounded up to 8; 8 x 8 AVX2
//     register transposes), each lane's nonzeros become contiguous AXPYs over up to 64 batch
//     columns held in registers, into a [64 rows x 64 columns] tile per window of 64 rows (16 KiB,
//     in L1), which goes to y [B, N] by 8 x 8 register transposes of the tile rows of 8 consecutive
//     output rows (found through pos_of): 8-float stores whatever the sorting.
//   * portable scalar fallback for CPUs without AVX2+FMA (and for tests: force_portable).
// Summation order: per row, products alternate between two partial sums (entries j even / odd;
// B > 1: several accumulator sets), so results match the reference to fp32 rounding, not bitwise;
// they do not depend on the thread count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pyserve {
namespace sparse {

struct CsrPacked {
  int64_t N = 0, K = 0, nnz = 0;
  int64_t slices = 0;        // S = ceil(N / 8)
  bool sorted_rows = false;  // rows sorted by length within windows of kPackedSortWindow rows
  int index_bits = 16;       // 16: idx16 holds the indices; 32: idx32
  bool natural_order = true; // row_of[p] == p for every real lane (no sorting happened)
  std::vector<int64_t> slice_ptr;  // [S + 1] offset of each slice's entries (multiple of 8)
  std::vector<int32_t> slice_min;  // [S]
  std::vector<int32_t> row_len;    // [8 S]
  std::vector<int32_t> row_of;     // [8 S], -1 for padding lanes
  std::vector<int32_t> pos_of;     // [N] lane of row n (row_of[pos_of[n]] == n)
  std::vector<uint16_t> idx16;     // [slice_ptr[S]] when index_bits == 16
  std::vector<int32_t> idx32;      // [slice_ptr[S]] when index_bits == 32
  std::vector<float> val;          // [slice_ptr[S]]

  std::size_t nbytes() const {
    return slice_ptr.size() * 8 + (slice_min.size() + row_len.size() + row_of.size() + pos_of.size()) * 4 +
           idx16.size() * 2 +
           idx32.size() * 4 + val.size() * 4;
  }
};

constexpr int64_t kPackedLanes = 8;               // C of SELL-C-sigma
constexpr int64_t kPackedMaxK16 = int64_t{1} << 16;  // largest K with 16-bit column indices
constexpr int64_t kPackedMaxK = int64_t{1} << 31;    // exclusive bound on K (32-bit indices)
constexpr int64_t kPackedSortWindow = 64;            // sigma: rows sorted within aligned windows of 64

// Builds the packed form of a valid CSR matrix (indptr [N + 1] int64, indices [nnz] of Index,
// values [nnz]); K < kPackedMaxK; sort_rows: < 0 auto, 0 natural order, > 0 sorted windows.
// 16-bit indices when K <= kPackedMaxK16.
template <typename Index>
CsrPacked csr_pack(const int64_t* indptr, int64_t N, const Index* indices, const float* values, int64_t K,
                   int sort_rows);

// Floats of scratch csr_packed_linear_cpu needs for a [B, K] input (0 when B <= 1).
int64_t csr_packed_scratch_floats(int64_t B, int64_t K);

// y [B, N] = x [B, K] @ W.T + bias (bias may be null), x and y row-major and contiguous, W packed.
// xt_scratch: at least csr_packed_scratch_floats(B, K) floats (null when that is 0).
void csr_packed_linear_cpu(const float* x, int64_t B, const CsrPacked& w, const float* bias, float* y,
                           float* xt_scratch, int threads, bool force_portable);

// x [B, K] -> xt [K, Bp] (Bp >= B; columns B..Bp-1 zero): the SpMM kernels' K-major copy of x, raw
// and packed alike; 8 x 8 AVX2 register blocks when `avx2` (and the build has the AVX2 path),
// scalar tiles otherwise. Serial on purpose: K*B copies take microseconds, and a second parallel
// region per call would add a fork-join, which costs milliseconds on an oversubscribed machine.
void transpose_pad(const float* x, int64_t B, int64_t K, int64_t Bp, float* xt, bool avx2);

}  // namespace sparse
}  // namespace pyserve
