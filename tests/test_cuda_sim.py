"""The CPU simulation of the CUDA kernels (tests/cuda_sim/) against the PTX ISA and the CUDA programming model.

test_cuda_backend.py runs csrc/ in the simulation ("simulated-v2" / "simulated-v1"); these tests make that worth
something. They run test kernels (tests/cuda_sim/sim_test.cu, built like csrc/ and calling the same common.cuh
wrappers) and compare with the instruction definitions written out here independently, from the PTX ISA text:
- ldmatrix .x4 with and without .trans, for any row addresses; the mma.sync m16n8k16 (f16, bf16) and m16n8k8 (tf32)
  fragment layouts, on exactly representable integers and on random values, and a 16x16x16 GEMM the way the conv tiles
  do it (ldmatrix operands, two m16n8k16) against a matmul; the WMMA stand-in;
- cp.async: copies land only at cp.async.wait_group (stale data before, uncommitted copies excluded), zero-fill
  without reading the source, a 2-stage pipeline that waits one group too few gives a wrong answer;
- errors instead of wrong answers or hangs: misaligned or out-of-range copies and ldmatrix rows, warp collectives
  reached by part of a warp or mixed, deadlocks, divergent __syncthreads, writes past the shared memory, launch
  configurations CUDA refuses, too much shared memory without the attribute;
- built-in variables, shuffles, the thread order switch (SEG3D_SIMT_SCHEDULE) exposing a missing barrier, and the
  fp16 / bf16 / tf32 conversions bit for bit against PyTorch and an independent rounding.
"""
import faulthandler
import math
import os
import re
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def sim(request):
    from cuda_sim.build import build_test_module

    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    return build_test_module(cache_dir=cache.mkdir("seg3d_simt") if cache is not None else None)


@pytest.fixture
def no_hang():
    """A simulation that hangs fails the run (with every thread's stack) instead of stalling it."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _u32(t):
    return t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _pack(lo, hi):
    """Two b16 bit patterns (int64 tensors) -> one 32-bit register, lo in the low half."""
    return (lo & 0xFFFF) | ((hi & 0xFFFF) << 16)


def _b16_bits(t):
    return t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def _regs_tensor(regs):
    """int64 register values -> the int32 tensor the kernels read as uint32."""
    regs = regs & 0xFFFFFFFF
    return torch.where(regs >= 2**31, regs - 2**32, regs).to(torch.int32)


# ---- the PTX ISA fragment definitions (groupID = lane >> 2, threadID_in_group = lane % 4) ---------------------------

def _a16816(lane, i):
    """mma.m16n8k16 .f16/.bf16 A element a_i (i < 8) of `lane`: (row, col)."""
    g, t = lane >> 2, lane % 4
    row = g if (i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def _b16816(lane, i):
    """mma.m16n8k16 .f16/.bf16 B element b_i (i < 4): (row = k, col = n)."""
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def _c16n8(lane, i):
    """Accumulator c_i (i < 4) of m16n8k16 and m16n8k8: (row, col)."""
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def _a1688_tf32(lane, i):
    g, t = lane >> 2, lane % 4
    return (g if i in (0, 2) else g + 8), (t if i < 2 else t + 4)


def _b1688_tf32(lane, i):
    g, t = lane >> 2, lane % 4
    return (t if i == 0 else t + 4), g


def _fragments_16816(A, B, C):
    """A (16, 16), B (16, 8) in a 16-bit dtype, C (16, 8) fp32 -> per-lane registers a (32, 4), b (32, 2), c (32, 4)."""
    ab, bb = _b16_bits(A), _b16_bits(B)
    a = torch.zeros(32, 4, dtype=torch.int64)
    b = torch.zeros(32, 2, dtype=torch.int64)
    c = torch.zeros(32, 4, dtype=torch.float32)
    for lane in range(32):
        for r in range(4):  # register r holds elements 2r (low half) and 2r + 1
            a[lane, r] = _pack(ab[_a16816(lane, 2 * r)], ab[_a16816(lane, 2 * r + 1)])
        for r in range(2):
            b[lane, r] = _pack(bb[_b16816(lane, 2 * r)], bb[_b16816(lane, 2 * r + 1)])
        for i in range(4):
            c[lane, i] = C[_c16n8(lane, i)]
    return _regs_tensor(a), _regs_tensor(b), c


def _unfragment_c(d):
    D = torch.empty(16, 8, dtype=d.dtype)
    for lane in range(32):
        for i in range(4):
            D[_c16n8(lane, i)] = d[lane, i]
    return D


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("values", ["integers", "random"])
def test_mma_m16n8k16_fragments(sim, dtype, values):
    if values == "integers":  # every product and sum exact: any misplaced element changes the result
        A = torch.randint(-8, 9, (16, 16)).to(dtype)
        B = torch.randint(-8, 9, (16, 8)).to(dtype)
        C = torch.randint(-64, 65, (16, 8)).float()
    else:
        A, B, C = torch.randn(16, 16).to(dtype), torch.randn(16, 8).to(dtype), torch.randn(16, 8)
    a, b, d = _fragments_16816(A, B, C)
    sim.mma16816(a.data_ptr(), b.data_ptr(), d.data_ptr(), dtype == torch.bfloat16, 32)
    expected = A.double() @ B.double() + C.double()
    got = _unfragment_c(d).double()
    if values == "integers":
        assert torch.equal(got, expected)
    else:  # exact products, fp32 sums
        scale = (A.double().abs() @ B.double().abs() + C.double().abs())
        assert ((got - expected).abs() <= 8 * 2**-24 * scale).all()


@pytest.mark.parametrize("values", ["integers", "random"])
def test_mma_m16n8k8_tf32_fragments(sim, values):
    if values == "integers":
        A, B = torch.randint(-8, 9, (16, 8)).float(), torch.randint(-8, 9, (8, 8)).float()
        C = torch.randint(-64, 65, (16, 8)).float()
    else:
        A, B, C = _tf32_round(torch.randn(16, 8)), _tf32_round(torch.randn(8, 8)), torch.randn(16, 8)
    ab, bb = _u32(A), _u32(B)
    a = torch.zeros(32, 4, dtype=torch.int64)
    b = torch.zeros(32, 2, dtype=torch.int64)
    d = torch.zeros(32, 4, dtype=torch.float32)
    for lane in range(32):
        for i in range(4):
            a[lane, i] = ab[_a1688_tf32(lane, i)]
            d[lane, i] = C[_c16n8(lane, i)]
        for i in range(2):
            b[lane, i] = bb[_b1688_tf32(lane, i)]
    a, b = _regs_tensor(a), _regs_tensor(b)
    sim.mma1688(a.data_ptr(), b.data_ptr(), d.data_ptr())
    expected = A.double() @ B.double() + C.double()
    got = _unfragment_c(d).double()
    if values == "integers":
        assert torch.equal(got, expected)
    else:
        scale = A.double().abs() @ B.double().abs() + C.double().abs()
        assert ((got - expected).abs() <= 8 * 2**-24 * scale).all()


def test_mma_tf32_rejects_unrounded_operands(sim):
    a = torch.full((32, 4), 0x3F800001, dtype=torch.int32)  # 1 + 2^-23: not a tf32 value
    b = torch.full((32, 2), 0x3F800000, dtype=torch.int32)
    d = torch.zeros(32, 4)
    with pytest.raises(RuntimeError, match="not a tf32 value"):
        sim.mma1688(a.data_ptr(), b.data_ptr(), d.data_ptr())


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4(sim, trans):
    """Lane l gives the address of row l % 8 of matrix l / 8 (any rows of shared memory, here shuffled); lane l
    receives in register i the two b16 values of matrix i at row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1, low half
    first; with .trans those of the transposed matrix."""
    stride = 16  # elements per shared row (16-byte aligned rows)
    rows = 40
    src = torch.randint(0, 1 << 16, (rows, stride), dtype=torch.int64)
    src_bits = src.to(torch.int32).to(torch.int16)  # the low 16 bits
    rows_of_lane = torch.randperm(rows)[:32].to(torch.int32)
    out = torch.zeros(32, 4, dtype=torch.int32)
    sim.ldmatrix(src_bits.data_ptr(), rows_of_lane.data_ptr(), out.data_ptr(), rows, stride, 0, trans)
    mats = [src[rows_of_lane[8 * i:8 * i + 8].long(), :8] for i in range(4)]  # matrix i: rows of lanes 8i .. 8i+7
    expected = torch.zeros(32, 4, dtype=torch.int64)
    for lane in range(32):
        for i in range(4):
            m = mats[i].T if trans else mats[i]
            r, c = lane // 4, 2 * (lane % 4)
            expected[lane, i] = _pack(m[r, c], m[r, c + 1])
    assert torch.equal(_u32(out), expected)


def test_ldmatrix_misaligned_row(sim):
    src = torch.zeros(40, 16, dtype=torch.int16)
    rows = torch.arange(32, dtype=torch.int32)
    out = torch.zeros(32, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="not 16-byte aligned"):
        sim.ldmatrix(src.data_ptr(), rows.data_ptr(), out.data_ptr(), 40, 16, 4, False)  # rows start at 8 bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b_kn", [False, True], ids=["B_nk", "B_kn"])
def test_gemm_with_ldmatrix_and_mma(sim, dtype, b_kn):
    """The conv tiles' use of the primitives: 16x16x16 from shared memory by ldmatrix (.trans for [k][n] B) and two
    m16n8k16, against a matmul."""
    A, B = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)  # B is (k, n)
    stored = B if b_kn else B.T.contiguous()
    D = torch.zeros(16, 16)
    sim.gemm(A.data_ptr(), stored.data_ptr(), D.data_ptr(), dtype == torch.bfloat16, b_kn)
    expected = A.double() @ B.double()
    scale = A.double().abs() @ B.double().abs()
    assert ((D.double() - expected).abs() <= 8 * 2**-24 * scale).all(), (D, expected)


@pytest.mark.parametrize("tf32", [False, True], ids=["f16_k16", "tf32_k8"])
@pytest.mark.parametrize("a_col,b_col", [(False, False), (True, False), (False, True), (True, True)])
def test_wmma_stand_in(sim, tf32, a_col, b_col):
    dtype = torch.float32 if tf32 else torch.float16
    A, B = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)
    As = A.T.contiguous() if a_col else A
    Bs = B.T.contiguous() if b_col else B
    D = torch.zeros(16, 16)
    sim.wmma(As.data_ptr(), Bs.data_ptr(), D.data_ptr(), tf32, a_col, b_col)
    Ar, Br = (_tf32_round(A), _tf32_round(B)) if tf32 else (A, B)
    expected = Ar.double() @ Br.double()
    scale = Ar.double().abs() @ Br.double().abs()
    assert ((D.double() - expected).abs() <= 8 * 2**-24 * scale).all()


# ---- cp.async -------------------------------------------------------------------------------------------------------

def test_cp_async_groups_and_deferral(sim):
    src = [torch.arange(128, dtype=torch.float32) + 1000 * (k + 1) for k in range(3)]
    sentinel = torch.full((4,), 7.0)  # the source of the valid = false copy: must not show up
    out = torch.full((8, 32, 3, 4), float("nan"))
    sim.cp_async_steps(src[0].data_ptr(), src[1].data_ptr(), src[2].data_ptr(), sentinel.data_ptr(), out.data_ptr())
    stale = torch.full((32, 4), -1.0)
    copied = [s.view(32, 4) for s in src]
    expected = {  # step: (slot A, slot B, slot C)
        0: (stale, stale, stale),  # issued: nothing copied yet
        1: (stale, stale, stale),  # committed: still nothing
        2: (stale, stale, stale),
        3: (copied[0], stale, stale),  # wait_group 1: all but the most recent group
        4: (copied[0], copied[1], stale),  # wait_group 0
        5: (copied[0], copied[1], stale),  # an uncommitted copy is in no group: wait_group 0 leaves it
        6: (copied[0], copied[1], copied[2]),
        7: (torch.zeros(32, 4), copied[1], copied[2]),  # valid = false: zero-filled
    }
    for step, slots in expected.items():
        for s, want in enumerate(slots):
            assert torch.equal(out[step, :, s], want), (step, "ABC"[s], out[step, :, s])


def test_cp_async_zero_fill_does_not_read_the_source(sim):
    """The valid = false copy's source is an unreadable page: reading it would kill the process (so: a subprocess)."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.fspath(os.path.dirname(__file__))!r})
from cuda_sim.build import load
sim = load({sim.__file__!r}, "_simt_test")
src = torch.zeros(128)
out = torch.full((8, 32, 3, 4), float("nan"))
sim.cp_async_steps(src.data_ptr(), src.data_ptr(), src.data_ptr(), sim.unreadable_address(), out.data_ptr())
assert torch.equal(out[7, :, 0], torch.zeros(32, 4))
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)


def test_cp_async_pipeline_waiting_one_group_too_few_fails(sim):
    tiles = 5
    src = torch.randint(-50, 50, (tiles, 32, 4)).float()
    expected = src.roll(-1, dims=1).sum((0, 2))  # lane l sums lane l + 1's copies (integers: exact)
    out = torch.zeros(32)
    sim.pipeline(src.data_ptr(), out.data_ptr(), tiles, 1)
    assert torch.equal(out, expected)
    sim.pipeline(src.data_ptr(), out.data_ptr(), tiles, 2)  # reads each stage before its copies have landed
    assert not torch.equal(out, expected)


def test_cp_async_checks(sim):
    buf = torch.zeros(64, dtype=torch.float32)
    base = buf.data_ptr()
    assert base % 16 == 0
    sim.cp_async_one(base, 16, 16, 64)  # fine
    with pytest.raises(RuntimeError, match=r"shared address .* not aligned to its 16 bytes"):
        sim.cp_async_one(base, 8, 16, 64)
    with pytest.raises(RuntimeError, match=r"global address .* not aligned to its 16 bytes"):
        sim.cp_async_one(base + 4, 0, 16, 64)
    with pytest.raises(RuntimeError, match=r"cp.async of 12 bytes"):
        sim.cp_async_one(base, 0, 12, 64)
    with pytest.raises(RuntimeError, match=r"outside the block's 64 bytes of dynamic shared memory"):
        sim.cp_async_one(base, 64, 16, 64)
    with pytest.raises(RuntimeError, match=r"source .* is in shared memory"):
        sim.cp_async_from_smem()
    sim.cp_async_one(base, 0, 4, 64)  # the module works on after errors


# ---- errors that must not be wrong answers or hangs ------------------------------------------------------------------

@pytest.mark.parametrize("which,message", [
    (0, r"mma.sync.aligned.m16n8k16 reached by only part of warp \d"),  # (which lanes notice: thread order)
    (1, r"lanes of warp \d at different warp collectives"),
    (2, r"cannot make progress \(deadlock\)"),
    (3, r"__syncthreads at .*sim_test.cu:\d+ while other threads wait at .*sim_test.cu:\d+"),
])
def test_divergent_collectives_and_barriers_are_errors(sim, no_hang, which, message):
    out = torch.zeros(128)
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure") as info:
        sim.divergent(which, out.data_ptr())
    assert re.search(message, str(info.value)), str(info.value)
    sim.divergent(4, out.data_ptr())  # a good kernel runs after it


def test_partial_warp_mma_is_an_error(sim, no_hang):
    a = torch.zeros(32, 4, dtype=torch.int32)
    b = torch.zeros(32, 2, dtype=torch.int32)
    d = torch.zeros(32, 4)
    with pytest.raises(RuntimeError, match="reached by only part of warp 0"):
        sim.mma16816(a.data_ptr(), b.data_ptr(), d.data_ptr(), False, 16)


def test_launch_after_an_unread_failure_is_an_error(sim, no_hang):
    out = torch.zeros(128)
    with pytest.raises(RuntimeError, match="whose error nobody read"):
        sim.unchecked_failure_then_launch(out.data_ptr())
    sim.divergent(4, out.data_ptr())


def test_launch_configurations_cuda_refuses(sim):
    out = torch.zeros(128)
    assert sim.bad_configs(out.data_ptr()) == ["cudaErrorInvalidConfiguration"] * 3


def test_shared_memory_poison_canary_and_limit(sim):
    out = torch.zeros(64)
    sim.smem_fresh(out.data_ptr(), 64)
    assert (out.view(torch.int32) == -1).all()  # 0xFF bytes: NaN in fp32 (and fp16, bf16)
    sim.smem_write(99, 100, False)
    with pytest.raises(RuntimeError, match="wrote past the end of its 100 bytes of dynamic shared memory"):
        sim.smem_write(100, 100, False)
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):  # > 48 KiB needs the function attribute
        sim.smem_write(0, 64 * 1024, False)
    sim.smem_write(0, 64 * 1024, True)
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):  # beyond sm_90's 227 KiB
        sim.smem_write(0, 228 * 1024, True)


def test_thread_order_exposes_a_missing_barrier(sim, monkeypatch):
    n = 64
    results = {}
    for barrier in (False, True):
        for schedule in ("forward", "reverse", "random:3"):
            monkeypatch.setenv("SEG3D_SIMT_SCHEDULE", schedule)
            out = torch.zeros(n)
            sim.neighbour(out.data_ptr(), n, barrier)
            results[barrier, schedule] = out
    right = (torch.arange(n) + 1).roll(-1).float()
    for schedule in ("forward", "reverse", "random:3"):
        assert torch.equal(results[True, schedule], right)
    assert not torch.equal(results[False, "forward"], results[False, "reverse"])
    monkeypatch.setenv("SEG3D_SIMT_SCHEDULE", "sideways")
    with pytest.raises(RuntimeError, match="SEG3D_SIMT_SCHEDULE"):
        sim.neighbour(torch.zeros(n).data_ptr(), n, True)


# ---- built-in variables and shuffles ------------------------------------------------------------------------------

def test_builtin_indices(sim):
    grid, block = (2, 3, 2), (4, 2, 3)  # 24 threads: the block ends mid-warp
    nb, nt = math.prod(grid), math.prod(block)
    out = torch.full((nb * nt, 12), -1, dtype=torch.int32)
    sim.indices(out.data_ptr(), grid, block)
    rows = []
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                for tz in range(block[2]):
                    for ty in range(block[1]):
                        for tx in range(block[0]):
                            rows.append([bx, by, bz, tx, ty, tz, *block, *grid])
    assert torch.equal(out, torch.tensor(rows, dtype=torch.int32))


@pytest.mark.parametrize("arg,width", [(5, 32), (3, 8), (9, 8), (1, 2)])
def test_shuffles(sim, arg, width):
    """A 2D block (8 x 4): lanes are linear thread indices."""
    out = torch.zeros(32, 4, dtype=torch.int32)
    sim.shfl(out.data_ptr(), (8, 4, 1), arg, width)
    expected = torch.zeros(32, 4, dtype=torch.int32)
    for lane in range(32):
        base = lane // width * width
        src = [base + arg % width,
               lane - arg if lane - arg >= base else lane,
               lane + arg if lane + arg < base + width else lane,
               lane ^ arg if base <= (lane ^ arg) < base + width else lane]
        expected[lane] = torch.tensor([100 * s for s in src])
    assert torch.equal(out, expected)


def test_shuffle_masks_with_exited_and_missing_lanes(sim, no_hang):
    """CUDA: every non-exited thread named in the mask must execute the shuffle; reading an inactive one is undefined.
    A block ending mid-warp and a lane that returned early are fine until a lane reads from them."""
    out = torch.full((48,), -1, dtype=torch.int32)
    sim.shfl_exits(0, out.data_ptr())
    assert torch.equal(out, torch.arange(48).view(3, 16).sum(1).repeat_interleave(16).to(torch.int32))
    with pytest.raises(RuntimeError, match="lane 0 reads lane 16, which does not exist"):
        sim.shfl_exits(1, out.data_ptr())
    out = torch.full((32,), -1, dtype=torch.int32)
    sim.shfl_exits(2, out.data_ptr())
    assert (out[:31] == 0).all() and out[31] == -1
    with pytest.raises(RuntimeError, match="lane 30 reads lane 31, which has exited"):
        sim.shfl_exits(3, out.data_ptr())


# ---- conversions ----------------------------------------------------------------------------------------------------

def _tf32_round(x):
    """Round to nearest, ties away from zero, to 11 significant bits, in float64 arithmetic (normal range)."""
    x64 = x.double()
    m, e = torch.frexp(x64)  # x = m 2^e, 0.5 <= |m| < 1
    scaled = m.abs() * 2**11
    r = torch.floor(scaled + 0.5) * torch.sign(m)
    return torch.ldexp(r, e - 11).float()


def _interesting_floats():
    specials = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e6, -1e6, 2**-14, 2**-24, 2**-25,
                1.5 * 2**-25, 3 * 2**-26, 2**-26, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 1 + 2**-8, 1 + 3 * 2**-8,
                3.4028234663852886e38, 1e-40, -1e-45, float("inf"), float("-inf")]
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-9, 1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e5, 1e30])
    random = (torch.randn(20000, generator=gen, dtype=torch.float64) *
              scales[torch.randint(0, len(scales), (20000,), generator=gen)]).float()
    bits = torch.randint(-2**31, 2**31 - 1, (20000,), generator=gen, dtype=torch.int64).to(torch.int32)
    any_bits = bits.view(torch.float32)
    x = torch.cat([torch.tensor(specials, dtype=torch.float32), random, any_bits[~any_bits.isnan()]])
    return x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float_to_16bit_round_to_nearest_even(sim, dtype):
    x = _interesting_floats()
    out = torch.zeros(len(x), dtype=dtype)
    (sim.float_to_half if dtype == torch.float16 else sim.float_to_bf16)(x.data_ptr(), out.data_ptr(), len(x))
    assert torch.equal(out.view(torch.int16), x.to(dtype).view(torch.int16))
    nan = torch.tensor([float("nan"), -float("nan")])
    out = torch.zeros(2, dtype=dtype)
    (sim.float_to_half if dtype == torch.float16 else sim.float_to_bf16)(nan.data_ptr(), out.data_ptr(), 2)
    assert (out.view(torch.int16) == 0x7FFF).all()  # CUDA's canonical NaN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_to_float_every_value(sim, dtype):
    h = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    out = torch.zeros(len(h))
    (sim.half_to_float if dtype == torch.float16 else sim.bf16_to_float)(h.data_ptr(), out.data_ptr(), len(h))
    ref = h.float()
    assert torch.equal(out.isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert torch.equal(out[ok].view(torch.int32), ref[ok].view(torch.int32))


def test_tf32_round_to_nearest_ties_away(sim):
    x = _interesting_floats()
    out = torch.zeros(len(x), dtype=torch.int32)
    sim.float_to_tf32(x.data_ptr(), out.data_ptr(), len(x))
    got = out.view(torch.float32)
    assert ((out & 0x1FFF) == 0).all()
    normal = x.isfinite() & (x.abs() >= 2**-126) & (x.abs() < 3.4e38)
    assert torch.equal(got[normal], _tf32_round(x[normal]))
    ties = torch.tensor([1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11], dtype=torch.float32)
    out = torch.zeros(3, dtype=torch.int32)
    sim.float_to_tf32(ties.data_ptr(), out.data_ptr(), 3)
    assert out.view(torch.float32).tolist() == [1 + 2**-10, -(1 + 2**-10), 1 + 2 * 2**-10]  # away from zero
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4028234663852886e38])
    out = torch.zeros(4, dtype=torch.int32)
    sim.float_to_tf32(special.data_ptr(), out.data_ptr(), 4)
    assert out.view(torch.float32)[:2].tolist() == [float("inf"), -float("inf")]
    assert out[2].item() == 0x7FFFFFFF and out.view(torch.float32)[3].item() == float("inf")


def test_context_switch_is_the_fast_one(sim):
    """x86-64 hosts switch fibers in a few instructions; others use ucontext (slower, still correct)."""
    import platform

    expected = "x86-64 assembly" if platform.machine() in ("x86_64", "AMD64") else "ucontext"
    assert sim.context_switch() == expected
