// Test kernels for the simulator's own primitives (tests/test_cuda_sim.py), compiled like csrc/ (build.py) into the
// module `_simt_test`. They call the production wrappers of csrc/common.cuh (cp_async, ldmatrix_x4, mma_16816,
// mma_1688_tf32, to_tf32) and launch through SEG3D_LAUNCH / SEG3D_DYNAMIC_SMEM. Addresses are CPU tensors'
// data_ptr(); every entry point raises RuntimeError with the CUDA error text when a launch fails.
#include <pybind11/pybind11.h>
#include <sys/mman.h>

#include <mma.h>

#include <stdexcept>
#include <string>

#include "common.cuh"

namespace py = pybind11;
using namespace seg3d;

namespace {

void check(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

template <class T> T* ptr(uint64_t a) { return reinterpret_cast<T*>(a); }

// ---- built-in variables ------------------------------------------------------------------------------------------
// out[global thread][12] = blockIdx, threadIdx, blockDim, gridDim (x, y, z each)
__global__ void indices_kernel(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int* o = out + (static_cast<long long>(block) * blockDim.x * blockDim.y * blockDim.z + thread) * 12;
  const unsigned v[12] = {blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z,
                          blockDim.x, blockDim.y, blockDim.z, gridDim.x, gridDim.y, gridDim.z};
  for (int i = 0; i < 12; ++i) o[i] = static_cast<int>(v[i]);
}

void indices(uint64_t out, py::tuple grid, py::tuple block) {
  const dim3 g(grid[0].cast<unsigned>(), grid[1].cast<unsigned>(), grid[2].cast<unsigned>());
  const dim3 b(block[0].cast<unsigned>(), block[1].cast<unsigned>(), block[2].cast<unsigned>());
  SEG3D_LAUNCH(indices_kernel, g, b, 0, 0)(ptr<int>(out));
  check("indices_kernel");
}

// ---- shuffles ----------------------------------------------------------------------------------------------------
// out[thread][4] = __shfl_sync(v, arg), __shfl_up_sync(v, arg), __shfl_down_sync(v, arg), __shfl_xor_sync(v, arg)
// with v = 100 * linear thread index; width as given.
__global__ void shfl_kernel(int* out, int arg, int width) {
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int v = 100 * t;
  out[t * 4 + 0] = __shfl_sync(0xffffffffu, v, arg, width);
  out[t * 4 + 1] = __shfl_up_sync(0xffffffffu, v, arg, width);
  out[t * 4 + 2] = __shfl_down_sync(0xffffffffu, v, arg, width);
  out[t * 4 + 3] = __shfl_xor_sync(0xffffffffu, v, arg, width);
}

void shfl(uint64_t out, py::tuple block, int arg, int width) {
  const dim3 b(block[0].cast<unsigned>(), block[1].cast<unsigned>(), block[2].cast<unsigned>());
  SEG3D_LAUNCH(shfl_kernel, 1, b, 0, 0)(ptr<int>(out), arg, width);
  check("shfl_kernel");
}

// Lanes named in a shuffle's mask that have exited or do not exist are not waited for; reading one is an error.
// case 0: a block of 48 threads (warp 1 has 16 lanes) sums v = thread index over groups of 16 lanes with
//         __shfl_xor_sync(0xffffffff, v, 8 / 4 / 2 / 1): out[t] = the group's sum
//      1: the same with offset 16 first: warp 1 reads lanes that do not exist
//      2: 32 threads, lane 31 returns, the others broadcast lane 0's value: out[t] = 0
//      3: 32 threads, lane 31 returns, the others __shfl_xor_sync(.., 1): lane 30 reads the exited lane 31
__global__ void shfl_exits_kernel(int which, int* out) {
  const int t = threadIdx.x;
  int v = t;
  switch (which) {
    case 0:
    case 1:
      for (int off = which == 1 ? 16 : 8; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      break;
    case 2:
    case 3:
      if (t == 31) return;
      v = which == 2 ? __shfl_sync(0xffffffffu, v, 0) : __shfl_xor_sync(0xffffffffu, v, 1);
      break;
  }
  out[t] = v;
}

void shfl_exits(int which, uint64_t out) {
  SEG3D_LAUNCH(shfl_exits_kernel, 1, which < 2 ? 48 : 32, 0, 0)(which, ptr<int>(out));
  check("shfl_exits_kernel");
}

// ---- ldmatrix ----------------------------------------------------------------------------------------------------
// src: `rows` rows of `stride` b16 values, copied to shared memory at element offset `offset`; lane l passes the
// address of shared row rows_of_lane[l]. out[lane][4] = the four registers.
template <bool TRANS>
__global__ void ldmatrix_kernel(const uint16_t* src, const int* rows_of_lane, uint32_t* out, int rows, int stride,
                                int offset) {
  SEG3D_DYNAMIC_SMEM(smem_raw);
  auto* smem = reinterpret_cast<uint16_t*>(smem_raw) + offset;
  const int lane = threadIdx.x;
  for (int i = lane; i < rows * stride; i += 32) smem[i] = src[i];
  __syncthreads();
  uint32_t r[4];
  ldmatrix_x4<TRANS>(r, smem + rows_of_lane[lane] * stride);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

void ldmatrix(uint64_t src, uint64_t rows_of_lane, uint64_t out, int rows, int stride, int offset, bool trans) {
  const size_t smem = (offset + rows * stride) * sizeof(uint16_t);
  if (trans) SEG3D_LAUNCH(ldmatrix_kernel<true>, 1, 32, smem, 0)(ptr<uint16_t>(src), ptr<int>(rows_of_lane),
                                                                 ptr<uint32_t>(out), rows, stride, offset);
  else SEG3D_LAUNCH(ldmatrix_kernel<false>, 1, 32, smem, 0)(ptr<uint16_t>(src), ptr<int>(rows_of_lane),
                                                            ptr<uint32_t>(out), rows, stride, offset);
  check("ldmatrix_kernel");
}

// ---- mma.sync on given fragments ---------------------------------------------------------------------------------
// a[lane][4], b[lane][2] registers, d[lane][4] accumulators in and out; `lanes` lanes call the mma (the rest return).
template <class T>
__global__ void mma16816_kernel(const uint32_t* a, const uint32_t* b, float* d, int lanes) {
  const int l = threadIdx.x;
  if (l >= lanes) return;
  const uint32_t ra[4] = {a[l * 4], a[l * 4 + 1], a[l * 4 + 2], a[l * 4 + 3]};
  const uint32_t rb[2] = {b[l * 2], b[l * 2 + 1]};
  float rd[4] = {d[l * 4], d[l * 4 + 1], d[l * 4 + 2], d[l * 4 + 3]};
  mma_16816<T>(rd, ra, rb);
  for (int i = 0; i < 4; ++i) d[l * 4 + i] = rd[i];
}

void mma16816(uint64_t a, uint64_t b, uint64_t d, bool bf16, int lanes) {
  if (bf16) SEG3D_LAUNCH(mma16816_kernel<__nv_bfloat16>, 1, 32, 0, 0)(ptr<uint32_t>(a), ptr<uint32_t>(b),
                                                                       ptr<float>(d), lanes);
  else SEG3D_LAUNCH(mma16816_kernel<__half>, 1, 32, 0, 0)(ptr<uint32_t>(a), ptr<uint32_t>(b), ptr<float>(d), lanes);
  check("mma16816_kernel");
}

__global__ void mma1688_kernel(const uint32_t* a, const uint32_t* b, float* d) {
  const int l = threadIdx.x;
  const uint32_t ra[4] = {a[l * 4], a[l * 4 + 1], a[l * 4 + 2], a[l * 4 + 3]};
  const uint32_t rb[2] = {b[l * 2], b[l * 2 + 1]};
  float rd[4] = {d[l * 4], d[l * 4 + 1], d[l * 4 + 2], d[l * 4 + 3]};
  mma_1688_tf32(rd, ra, rb);
  for (int i = 0; i < 4; ++i) d[l * 4 + i] = rd[i];
}

void mma1688(uint64_t a, uint64_t b, uint64_t d) {
  SEG3D_LAUNCH(mma1688_kernel, 1, 32, 0, 0)(ptr<uint32_t>(a), ptr<uint32_t>(b), ptr<float>(d));
  check("mma1688_kernel");
}

// ---- a 16x16x16 GEMM as the conv tiles do it: ldmatrix operands from shared memory, two m16n8k16 ------------------
// A (16, 16) row-major; B (16, 16) stored [k][n] (b_kn) or [n][k]; D (16, 16) fp32 = A B. Rows padded by 8 elements.
template <class T, bool B_KN>
__global__ void gemm_kernel(const T* A, const T* B, float* D) {
  constexpr int LD = 24;
  SEG3D_DYNAMIC_SMEM(smem_raw);
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + 16 * LD;
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) {
    sA[(i / 16) * LD + i % 16] = A[i];
    sB[(i / 16) * LD + i % 16] = B[i];
  }
  __syncthreads();
  const int q = lane / 8, r = lane % 8;
  uint32_t a[4], bv[4];
  // A: matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
  ldmatrix_x4<false>(a, sA + (r + (q % 2) * 8) * LD + (q / 2) * 8);
  // B: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15); [k][n] storage read transposed
  if constexpr (B_KN) ldmatrix_x4<true>(bv, sB + (r + (q % 2) * 8) * LD + (q / 2) * 8);
  else ldmatrix_x4<false>(bv, sB + (r + (q / 2) * 8) * LD + (q % 2) * 8);
  const uint32_t b0[2] = {bv[0], bv[1]}, b1[2] = {bv[2], bv[3]};
  float d0[4] = {0, 0, 0, 0}, d1[4] = {0, 0, 0, 0};
  mma_16816<T>(d0, a, b0);
  mma_16816<T>(d1, a, b1);
  const int g = lane / 4, t = lane % 4;
  const float* ds[2] = {d0, d1};
  for (int j = 0; j < 2; ++j) {
    D[g * 16 + j * 8 + 2 * t] = ds[j][0];
    D[g * 16 + j * 8 + 2 * t + 1] = ds[j][1];
    D[(g + 8) * 16 + j * 8 + 2 * t] = ds[j][2];
    D[(g + 8) * 16 + j * 8 + 2 * t + 1] = ds[j][3];
  }
}

void gemm(uint64_t A, uint64_t B, uint64_t D, bool bf16, bool b_kn) {
  const size_t smem = 2 * 16 * 24 * 2;
  auto launch = [&](auto tag, auto kn) {
    using T = decltype(tag);
    SEG3D_LAUNCH((gemm_kernel<T, decltype(kn)::value>), 1, 32, smem, 0)(ptr<const T>(A), ptr<const T>(B),
                                                                         ptr<float>(D));
  };
  if (bf16) b_kn ? launch(__nv_bfloat16{}, std::true_type{}) : launch(__nv_bfloat16{}, std::false_type{});
  else b_kn ? launch(__half{}, std::true_type{}) : launch(__half{}, std::false_type{});
  check("gemm_kernel");
}

// ---- WMMA (the stand-in mma.h) -------------------------------------------------------------------------------------
// D (16, 16) fp32 = A B, A row-major (a_col: column-major) and B row-major (b_col: column-major), each 16 x 16 with
// leading dimension 16, fp16 k16 or tf32 k8 (two steps).
template <class T, class LA, class LB>
__global__ void wmma_kernel(const typename nvcuda::wmma::detail::storage<T>::type* A,
                            const typename nvcuda::wmma::detail::storage<T>::type* B, float* D, bool a_col, bool b_col) {
  using namespace nvcuda;
  constexpr int K = std::is_same<T, wmma::precision::tf32>::value ? 8 : 16;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k0 = 0; k0 < 16; k0 += K) {
    wmma::fragment<wmma::matrix_a, 16, 16, K, T, LA> a;
    wmma::fragment<wmma::matrix_b, 16, 16, K, T, LB> b;
    wmma::load_matrix_sync(a, a_col ? A + k0 * 16 : A + k0, 16);
    wmma::load_matrix_sync(b, b_col ? B + k0 : B + k0 * 16, 16);
    if constexpr (K == 8) {
      for (int e = 0; e < a.num_elements; ++e) a.x[e] = wmma::__float_to_tf32(a.x[e]);
      for (int e = 0; e < b.num_elements; ++e) b.x[e] = wmma::__float_to_tf32(b.x[e]);
    }
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::store_matrix_sync(D, acc, 16, wmma::mem_row_major);
}

void wmma(uint64_t A, uint64_t B, uint64_t D, bool tf32, bool a_col, bool b_col) {
  using namespace nvcuda::wmma;
  auto go = [&](auto tag, auto la, auto lb) {
    using T = decltype(tag);
    using S = typename detail::storage<T>::type;
    SEG3D_LAUNCH((wmma_kernel<T, decltype(la), decltype(lb)>), 1, 32, 0, 0)(ptr<const S>(A), ptr<const S>(B),
                                                                             ptr<float>(D), a_col, b_col);
  };
  if (tf32) {
    if (a_col) b_col ? go(precision::tf32{}, col_major{}, col_major{}) : go(precision::tf32{}, col_major{}, row_major{});
    else b_col ? go(precision::tf32{}, row_major{}, col_major{}) : go(precision::tf32{}, row_major{}, row_major{});
  } else {
    if (a_col) b_col ? go(__half{}, col_major{}, col_major{}) : go(__half{}, col_major{}, row_major{});
    else b_col ? go(__half{}, row_major{}, col_major{}) : go(__half{}, row_major{}, row_major{});
  }
  check("wmma_kernel");
}

// ---- cp.async ----------------------------------------------------------------------------------------------------
// One warp; each lane owns 16-byte slots A, B, C of shared memory (4 floats), first set to -1 by plain stores.
// snapshots out[step][lane][slot][4] after each step:
//   0: A issued (src_a)                     1: A committed
//   2: B issued (src_b) and committed       3: wait_group 1 (A has landed, B not)
//   4: wait_group 0 (B too)                 5: C issued (src_c), not committed, wait_group 0 (C not performed)
//   6: C committed, wait_group 0            7: A issued with valid = false from `invalid_src`, committed, waited
__global__ void cp_async_kernel(const float* src_a, const float* src_b, const float* src_c, const float* invalid_src,
                                float* out) {
  SEG3D_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  const int lane = threadIdx.x;
  float* slot[3] = {smem + lane * 4, smem + 128 + lane * 4, smem + 256 + lane * 4};
  for (int s = 0; s < 3; ++s)
    for (int e = 0; e < 4; ++e) slot[s][e] = -1.0f;
  auto snap = [&](int step) {
    for (int s = 0; s < 3; ++s)
      for (int e = 0; e < 4; ++e) out[((step * 32 + lane) * 3 + s) * 4 + e] = slot[s][e];
  };
  cp_async(slot[0], src_a + lane * 4, 16, true);
  snap(0);
  cp_async_commit();
  snap(1);
  cp_async(slot[1], src_b + lane * 4, 16, true);
  cp_async_commit();
  snap(2);
  cp_async_wait<1>();
  snap(3);
  cp_async_wait<0>();
  snap(4);
  cp_async(slot[2], src_c + lane * 4, 16, true);
  cp_async_wait<0>();
  snap(5);
  cp_async_commit();
  cp_async_wait<0>();
  snap(6);
  cp_async(slot[0], invalid_src, 16, false);
  cp_async_commit();
  cp_async_wait<0>();
  snap(7);
}

void cp_async_steps(uint64_t a, uint64_t b, uint64_t c, uint64_t invalid_src, uint64_t out) {
  SEG3D_LAUNCH(cp_async_kernel, 1, 32, 3 * 128 * sizeof(float), 0)(ptr<const float>(a), ptr<const float>(b),
                                                                   ptr<const float>(c), ptr<const float>(invalid_src),
                                                                   ptr<float>(out));
  check("cp_async_kernel");
}

// An address whose page cannot be read (the zero-fill test gives it as the source of valid = false copies).
uint64_t unreadable_address() {
  static void* page = mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) throw std::runtime_error("mmap");
  return reinterpret_cast<uint64_t>(page);
}

// A 2-stage cp.async pipeline summing `tiles` tiles of 32 floats per lane into out[lane], waiting with
// cp.async.wait_group `wait_n` before using a tile (1 is right; 2 uses a tile before it has landed).
template <int WAIT>
__global__ void pipeline_kernel(const float* src, float* out, int tiles) {
  SEG3D_DYNAMIC_SMEM(smem_raw);
  float* stage = reinterpret_cast<float*>(smem_raw);  // 2 stages x 32 lanes x 4 floats
  const int lane = threadIdx.x;
  auto load = [&](int t) { cp_async(stage + (t % 2) * 128 + lane * 4, src + (t * 32 + lane) * 4, 16, true); };
  load(0);
  cp_async_commit();
  float sum = 0.0f;
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) load(t + 1);
    cp_async_commit();
    cp_async_wait<WAIT>();
    __syncthreads();
    const float* s = stage + (t % 2) * 128 + ((lane + 1) % 32) * 4;  // a neighbour's copy: needs the barrier
    sum += s[0] + s[1] + s[2] + s[3];
    __syncthreads();
  }
  out[lane] = sum;
}

void pipeline(uint64_t src, uint64_t out, int tiles, int wait_n) {
  const size_t smem = 2 * 128 * sizeof(float);
  if (wait_n == 1) SEG3D_LAUNCH(pipeline_kernel<1>, 1, 32, smem, 0)(ptr<const float>(src), ptr<float>(out), tiles);
  else SEG3D_LAUNCH(pipeline_kernel<2>, 1, 32, smem, 0)(ptr<const float>(src), ptr<float>(out), tiles);
  check("pipeline_kernel");
}

// cp.async of `bytes` bytes to shared byte offset dst_offset from src (valid), waited for.
__global__ void cp_async_one_kernel(const unsigned char* src, int dst_offset, int bytes) {
  SEG3D_DYNAMIC_SMEM(smem_raw);
  cp_async(smem_raw + dst_offset, src, bytes, true);
  cp_async_commit();
  cp_async_wait<0>();
}

void cp_async_one(uint64_t src, int dst_offset, int bytes, int smem_bytes) {
  SEG3D_LAUNCH(cp_async_one_kernel, 1, 1, smem_bytes, 0)(ptr<const unsigned char>(src), dst_offset, bytes);
  check("cp_async_one_kernel");
}

// cp.async whose source is the block's own shared memory.
__global__ void cp_async_from_smem_kernel() {
  SEG3D_DYNAMIC_SMEM(smem_raw);
  cp_async(smem_raw, smem_raw + 64, 16, true);
  cp_async_commit();
  cp_async_wait<0>();
}

void cp_async_from_smem() {
  SEG3D_LAUNCH(cp_async_from_smem_kernel, 1, 1, 128, 0)();
  check("cp_async_from_smem_kernel");
}

// ---- shared memory ----------------------------------------------------------------------------------------------
// out[i] = the block's dynamic shared memory as first seen (nothing written), one float per thread.
__global__ void smem_fresh_kernel(float* out) {
  SEG3D_DYNAMIC_SMEM(smem_raw);
  out[threadIdx.x] = reinterpret_cast<const float*>(smem_raw)[threadIdx.x];
}

void smem_fresh(uint64_t out, int threads) {
  SEG3D_LAUNCH(smem_fresh_kernel, 1, threads, threads * sizeof(float), 0)(ptr<float>(out));
  check("smem_fresh_kernel");
}

// writes one byte at `offset` of a block of `smem_bytes` dynamic shared memory
__global__ void smem_write_kernel(int offset) {
  SEG3D_DYNAMIC_SMEM(smem_raw);
  smem_raw[offset] = 1;
}

void smem_write(int offset, int smem_bytes, bool set_attribute) {
  if (set_attribute)
    SEG3D_CHECK(cudaFuncSetAttribute(smem_write_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  SEG3D_LAUNCH(smem_write_kernel, 1, 1, smem_bytes, 0)(offset);
  check("smem_write_kernel");
}

// Thread t stores t + 1 to shared word t, then (barrier or not) reads word (t + 1) % n: without the barrier the
// result depends on the order the threads run in.
__global__ void neighbour_kernel(float* out, bool barrier) {
  SEG3D_DYNAMIC_SMEM(smem_raw);
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = static_cast<float>(t + 1);
  if (barrier) __syncthreads();
  out[t] = s[(t + 1) % n];
}

void neighbour(uint64_t out, int threads, bool barrier) {
  SEG3D_LAUNCH(neighbour_kernel, 1, threads, threads * sizeof(float), 0)(ptr<float>(out), barrier);
  check("neighbour_kernel");
}

// ---- kernels the simulation must reject -------------------------------------------------------------------------
// case 0: lanes 16-31 return, lanes 0-15 call mma.sync          1: lanes 0-15 ldmatrix, lanes 16-31 mma.sync
//      2: warp 0 lanes 0-15 shfl, every other thread __syncthreads (deadlock)
//      3: threads 0-63 __syncthreads at one line, threads 64-127 at another
//      4: a good kernel (all lanes mma.sync, all threads one barrier)
__global__ void divergent_kernel(int which, float* out) {
  SEG3D_DYNAMIC_SMEM(smem_raw);
  const int t = threadIdx.x, lane = t % 32;
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0}, r[4];
  float d[4] = {0, 0, 0, 0};
  switch (which) {
    case 0:
      if (lane >= 16) return;
      mma_16816<__half>(d, a, b);
      break;
    case 1:
      if (lane < 16) ldmatrix_x4<false>(r, smem_raw);
      else mma_16816<__half>(d, a, b);
      break;
    case 2:
      if (t < 16) d[0] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
      else __syncthreads();
      break;
    case 3:
      if (t < 64) __syncthreads();
      else __syncthreads();
      break;
    default:
      mma_16816<__half>(d, a, b);
      __syncthreads();
      break;
  }
  out[t] = d[0];
}

void divergent(int which, uint64_t out) {
  SEG3D_LAUNCH(divergent_kernel, 1, 128, 256, 0)(which, ptr<float>(out));
  check("divergent_kernel");
}

// Launches a kernel that fails without reading the error, then another launch.
void unchecked_failure_then_launch(uint64_t out) {
  SEG3D_LAUNCH(divergent_kernel, 1, 128, 256, 0)(0, ptr<float>(out));
  SEG3D_LAUNCH(divergent_kernel, 1, 128, 256, 0)(4, ptr<float>(out));
  check("divergent_kernel");
}

// Launch configurations CUDA refuses: returns the error names of grid (0, 1, 1), block 1025 and grid.y 65536.
py::list bad_configs(uint64_t out) {
  py::list names;
  SEG3D_LAUNCH(divergent_kernel, 0, 128, 256, 0)(4, ptr<float>(out));
  names.append(cudaGetErrorName(cudaGetLastError()));
  SEG3D_LAUNCH(divergent_kernel, 1, 1025, 256, 0)(4, ptr<float>(out));
  names.append(cudaGetErrorName(cudaGetLastError()));
  SEG3D_LAUNCH(divergent_kernel, dim3(1, 65536), 128, 256, 0)(4, ptr<float>(out));
  names.append(cudaGetErrorName(cudaGetLastError()));
  return names;
}

// ---- conversions (host calls of the device functions) -------------------------------------------------------------
void float_to_half(uint64_t in, uint64_t out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ptr<__half>(out)[i] = __float2half_rn(ptr<const float>(in)[i]);
}
void half_to_float(uint64_t in, uint64_t out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ptr<float>(out)[i] = __half2float(ptr<const __half>(in)[i]);
}
void float_to_bf16(uint64_t in, uint64_t out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ptr<__nv_bfloat16>(out)[i] = __float2bfloat16_rn(ptr<const float>(in)[i]);
}
void bf16_to_float(uint64_t in, uint64_t out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ptr<float>(out)[i] = __bfloat162float(ptr<const __nv_bfloat16>(in)[i]);
}
void float_to_tf32(uint64_t in, uint64_t out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ptr<uint32_t>(out)[i] = ::simt::cvt_rna_tf32(ptr<const float>(in)[i]);
}

}  // namespace

namespace simt {
const char* context_switch_kind();
}

PYBIND11_MODULE(_simt_test, m) {
  m.def("indices", &indices);
  m.def("shfl", &shfl);
  m.def("shfl_exits", &shfl_exits);
  m.def("ldmatrix", &ldmatrix);
  m.def("mma16816", &mma16816);
  m.def("mma1688", &mma1688);
  m.def("gemm", &gemm);
  m.def("wmma", &wmma);
  m.def("cp_async_steps", &cp_async_steps);
  m.def("unreadable_address", &unreadable_address);
  m.def("pipeline", &pipeline);
  m.def("cp_async_one", &cp_async_one);
  m.def("cp_async_from_smem", &cp_async_from_smem);
  m.def("smem_fresh", &smem_fresh);
  m.def("smem_write", &smem_write);
  m.def("neighbour", &neighbour);
  m.def("divergent", &divergent);
  m.def("unchecked_failure_then_launch", &unchecked_failure_then_launch);
  m.def("bad_configs", &bad_configs);
  m.def("float_to_half", &float_to_half);
  m.def("half_to_float", &half_to_float);
  m.def("float_to_bf16", &float_to_bf16);
  m.def("bf16_to_float", &bf16_to_float);
  m.def("float_to_tf32", &float_to_tf32);
  m.def("context_switch", [] { return std::string(::simt::context_switch_kind()); });
}
