"""Compile every Triton kernel variant of seg3d_fast for sm_90 ahead of time (no GPU needed) and report, per tile
config: compiles?, tensor-core instructions in the PTX (wgmma / mma.sync), bulk tensor copies (TMA), instructions
per iteration of the main loop, shared memory, registers and spills (ptxas -v). One JSON line per kernel variant and
config; a summary line last.

Why: a session without a GPU can still check that a kernel change compiles for the GPU with the Triton in use
(run it under each Triton version the project supports), keeps its tensor-core path and does not start spilling.

    python benchmarks/aot_check.py [--all-configs] [--only SUBSTRING]
"""
import argparse
import datetime
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be defined for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from seg3d_fast.backends.triton import conv3d_prelu as conv, jaccard, upconv  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # H100 / H200: largest dynamic shared memory of one block (227 KiB)
# integer arguments that Triton's launcher marks divisible by 16 in the cases that matter (it specializes on it)
DIV16 = {"C_SRC", "C_IN", "C_OUT", "K_TOTAL", "KT_PAD", "CO_PAD", "VOX_PER_SPLIT"}

CONV_POINTERS = ("src_ptr", "w_ptr", "bias_ptr", "alpha_ptr", "res_ptr", "out_ptr", "act_ptr")
_FWD = dict(STEP=1, FLAT_K=0, EVEN_N=True, PHASES=False, HAS_BIAS=True, ACT_KIND=2, RES_MODE=0,
            SAVE_ACT=False, BLOCK_N=64, BLOCK_K=64)
_DGRAD = dict(_FWD, HAS_BIAS=False, ACT_KIND=0, BLOCK_N=32)
# (variant, constexprs) of _conv_kernel: small-C forward (flat K), strided forward with the residual after the
# activation, 64-channel forward, plain and one-launch stride-2 dgrads (flat and per-tap K)
CONV = [
    ("fwd_flat", dict(_FWD, FLAT_K=8, EVEN_N=False, BLOCK_N=16, BLOCK_K=32)),
    ("fwd_c32_s2_res", dict(_FWD, STEP=2, RES_MODE=2, SAVE_ACT=True, BLOCK_K=32)),
    ("fwd_c64", dict(_FWD, ACT_KIND=1, RES_MODE=1)),
    ("fwd_c128", dict(_FWD, BLOCK_N=128)),
    ("fwd_c128_s2", dict(_FWD, STEP=2, BLOCK_N=128)),
    ("dgrad_c128", dict(_DGRAD, BLOCK_N=128)),
    ("dgrad_phases", dict(_DGRAD, PHASES=True)),
    ("dgrad_phases_c128", dict(_DGRAD, PHASES=True, BLOCK_N=128)),
    ("dgrad_phases_flat", dict(_DGRAD, PHASES=True, FLAT_K=8, EVEN_N=False, BLOCK_N=16, BLOCK_K=32)),
    ("dgrad_flat", dict(_DGRAD, FLAT_K=8, EVEN_N=False, BLOCK_N=16, BLOCK_K=32)),
]
# _conv_tma_kernel: (variant, constexprs); the descriptors' block shapes follow from BD, BH, BW, BLOCK_K, BLOCK_N
_TMA = dict(KSIZE=3, TAP_SIGN=1, PHASES=False, HAS_BIAS=True, ACT_KIND=2, RES_MODE=0, SAVE_ACT=False, BLOCK_N=64,
            BLOCK_K=64)
TMA = [
    ("fwd_c64_box4x4x8", dict(_TMA, RES_MODE=1, BD=4, BH=4, BW=8)),
    ("fwd_c128_box2x4x8", dict(_TMA, BLOCK_N=128, BD=2, BH=4, BW=8)),
    ("fwd_c128_box4x4x8", dict(_TMA, BLOCK_N=128, BD=4, BH=4, BW=8)),
    ("fwd_c32_res_after_box1x8x16", dict(_TMA, BLOCK_N=32, BLOCK_K=32, RES_MODE=2, SAVE_ACT=True, BD=1, BH=8, BW=16)),
    ("dgrad_c16_box2x4x16", dict(_TMA, TAP_SIGN=-1, HAS_BIAS=False, ACT_KIND=0, BLOCK_N=16, BLOCK_K=16,
                                 BD=2, BH=4, BW=16)),
    ("fwd_k1_box2x4x8", dict(_TMA, KSIZE=1, ACT_KIND=0, BD=2, BH=4, BW=8)),
    ("dgrad_phases_c64_box2x4x8", dict(_TMA, TAP_SIGN=0, PHASES=True, HAS_BIAS=False, ACT_KIND=0,
                                       BD=2, BH=4, BW=8)),
]
# _wgrad_tma_kernel: (variant, constexprs) for 16-, 32-, 64- and 128-channel layers
WGRAD_TMA = [
    ("c16_box2x4x16", dict(KSIZE=3, BD=2, BH=4, BW=16, BLOCK_K=16, BLOCK_N=16)),
    ("c32_box4x4x8", dict(KSIZE=3, BD=4, BH=4, BW=8, BLOCK_K=32, BLOCK_N=32)),
    ("c64_box4x4x8", dict(KSIZE=3, BD=4, BH=4, BW=8, BLOCK_K=64, BLOCK_N=64)),
    ("c128_k1_box2x4x8", dict(KSIZE=1, BD=2, BH=4, BW=8, BLOCK_K=64, BLOCK_N=128)),
]
WGRAD_POINTERS = ("x_ptr", "g_ptr", "saved_ptr", "alpha_ptr", "dz_ptr")
# _wgrad_kernel: the PReLU-backward pass (dz, bias and alpha sums) and the exact-fp32 weight GEMM
WGRAD = [
    ("prelu_pass", dict(STEP=1, FLAT_K=0, DZ_KIND=1, ALPHA_PER_CH=True, COMPUTE_W=False, REDUCE_BIAS=True,
                        REDUCE_ALPHA=True, WRITE_DZ=True, BLOCK_KT=64, BLOCK_CO=64)),
    ("prelu_pass_c8", dict(STEP=1, FLAT_K=0, DZ_KIND=1, ALPHA_PER_CH=True, COMPUTE_W=False, REDUCE_BIAS=True,
                           REDUCE_ALPHA=True, WRITE_DZ=True, BLOCK_KT=32, BLOCK_CO=8)),
    ("weight_fma", dict(STEP=2, FLAT_K=8, DZ_KIND=0, ALPHA_PER_CH=False, COMPUTE_W=True, REDUCE_BIAS=False,
                        REDUCE_ALPHA=False, WRITE_DZ=False, BLOCK_KT=32, BLOCK_CO=16)),
]
WGRAD_GEMM = [
    ("c8_k3", dict(STEP=1, KSIZE=3, BLOCK_KT=128, BLOCK_CO=16)),
    ("c64_k3_s2", dict(STEP=2, KSIZE=3, BLOCK_KT=128, BLOCK_CO=64)),
]
# dtype label -> (pointer type, DOT_PREC); fp32 "ieee" only where the backend uses it. The parameters (weight, bias,
# alpha and their gradients) are float32 pointers for every dtype: mixed-precision training (autocast) passes them so.
PARAM = "*fp32"
DTYPES = [("bf16", "*bf16", "tf32"), ("fp16", "*fp16", "tf32"), ("fp32tf32", "*fp32", "tf32"),
          ("fp32ieee", "*fp32", "ieee")]


# the integer arguments that narrow layers (channel counts 4 or 8, K = 27 x C) do not have divisible by 16: variants
# for them are compiled as the launcher specializes them there (assuming otherwise hid their scalar loads)
NARROW = {"C_SRC", "C_IN", "C_OUT", "K_TOTAL"}


def build(kernel, types, constexprs, cfg, div16=DIV16):
    """div16: the integer arguments the launcher marks divisible by 16 (pointers always are)."""
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    names = fn.arg_names
    ce = dict(constexprs, **cfg.kwargs)
    sig = {n: ("constexpr" if n in ce else types.get(n, "i32")) for n in names}
    div = [i for i, n in enumerate(names) if n not in ce and (sig[n].startswith("*") or n in div16)]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in ce.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in div})
    return triton.compile(src, target=TARGET, options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def main_loop(ptx):
    """The PTX instructions of one iteration of the main loop: every block LLVM marks as the loop's header or "in
    Loop: Header=..." (a loop whose loads are predicated or split spans several blocks, laid out on both sides of
    its header), for the loop holding the tensor-core instructions (else the loads). Static counts: the
    per-iteration issue cost the README's tile comparisons quote."""
    loops, label, header, opening = {}, None, None, False
    for line in ptx.splitlines():
        text = line.strip()
        if text.startswith("$L__BB") or text.startswith("// %bb."):  # a new block
            label = re.match(r"\$L__(BB\d+_\d+):", text)
            label, header, opening = label and label.group(1), None, True
        if opening and "//" in text:  # the block's loop, from the comments on its first lines
            if "Loop Header" in text:
                header = label
            found = re.search(r"in Loop: Header=(BB\d+_\d+)", text)
            header = found.group(1) if found else header
            continue
        if text and not text.startswith(("//", ".", "{", "}", "$")):
            opening = False
            if header:
                loops.setdefault(header, []).append(text)
    main = [b for b in loops.values() if any("mma" in x for x in b)] or \
        [b for b in loops.values() if any("ld.global" in x or "cp.async" in x for x in b)]
    return max(main, key=len, default=[])


def ptxas_usage(ptx):
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path if hasattr(get_ptxas(90), "path") else get_ptxas(90)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "--gpu-name=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True)
    finally:
        os.unlink(f.name)
    log = out.stdout + out.stderr
    found = [re.search(p, log) for p in (r"Used (\d+) registers", r"(\d+) bytes spill stores",
                                         r"(\d+) bytes spill loads")]
    if not found[0]:
        raise RuntimeError(log[-500:])
    return [int(m.group(1)) if m else None for m in found]


class _Sized:
    """Stands for a tensor argument in a prune function: only its element size."""

    def __init__(self, size):
        self.size = size

    def element_size(self):
        return self.size


def check(kernel_name, variant, dtype, kernel, types, constexprs, all_configs, only, num_warps=4, narrow=False,
          div16=None):
    """num_warps: the launch's, for a kernel without autotuning; narrow: a variant for 4- or 8-channel layers;
    div16: the integer arguments divisible by 16 (default: DIV16, less NARROW for narrow variants)."""
    div16 = div16 if div16 is not None else DIV16 - NARROW if narrow else DIV16
    configs = list(kernel.configs) if isinstance(kernel, Autotuner) else [triton.Config({}, num_warps=num_warps)]
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:  # the tensor arguments it may look at, as their element sizes
        sizes = {name: _Sized(4 if t in ("*fp32", "*i32") else 8 if t in ("*i64",) else 2)
                 for name, t in types.items() if t.startswith("*")}
        configs = prune(configs, sizes, **constexprs)
    if not all_configs:  # the config used when tuning is off (SEG3D_FAST_AUTOTUNE=0): 64 rows, 8 warps
        configs = [c for c in configs if c.num_warps == 8 and 64 in c.kwargs.values()][:1] or configs[:1]
    rows = []
    for cfg in configs:
        tag = f"{kernel_name}/{variant}/{dtype}"
        if only and only not in tag:
            continue
        row = dict(kernel=tag, cfg=str(cfg.kwargs), warps=cfg.num_warps, stages=cfg.num_stages)
        t0 = time.time()
        try:
            compiled = build(kernel, types, constexprs, cfg, div16)
            ptx = compiled.asm["ptx"]
            loop = main_loop(ptx)
            row.update(ok=True, wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                       mma=len(re.findall(r"\bmma\.sync", ptx)), tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
                       smem=compiled.metadata.shared, loop_instr=len(loop),
                       # loads in the main loop that wait for their data (not cp.async / TMA): they stall each step
                       loop_sync_loads=sum("ld.global" in x for x in loop),
                       # barriers in the main loop (a reduction or layout change through shared memory each step)
                       loop_barriers=sum(x.startswith("bar.sync") for x in loop))
            row["regs"], row["spill_st"], row["spill_ld"] = ptxas_usage(ptx)
            row["smem_ok"] = row["smem"] <= SMEM_LIMIT
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        row["compile_s"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _vec(constexprs, pointer):
    """VEC of a flat-K variant: 8-channel layers (runs of 16 bytes at most); 1 (unused) otherwise."""
    return (4 if pointer == "*fp32" else 8) if constexprs.get("FLAT_K") else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-configs", action="store_true", help="every autotune config (default: the first)")
    parser.add_argument("--only", default="", help="only variants whose tag contains this")
    args = parser.parse_args(argv)
    rows = []
    for dname, pointer, prec in DTYPES:
        size = 4 if pointer == "*fp32" else 2
        for name, ce in CONV:
            if ce["BLOCK_N"] > 64 and pointer == "*fp32":
                continue  # 128-column tiles only for 2-byte inputs (conv3d_prelu._launch_conv)
            types = {p: pointer for p in CONV_POINTERS}
            types.update(bias_ptr=PARAM, alpha_ptr=PARAM, taps_ptr="*i32", phase_ptr="*i64", o_sn="i64")
            rows += check("conv", name, dname, conv._conv_kernel, types,
                          dict(ce, DOT_PREC=prec, VEC=_vec(ce, pointer), VEC_OUT=16 // size), args.all_configs,
                          args.only, narrow=ce["FLAT_K"])
        for name, ce in TMA if size == 2 else ():  # fp16/bf16 only (tma_unsupported)
            scalar = pointer[1:]
            types = {p: pointer for p in CONV_POINTERS[3:]}
            types.update(bias_ptr=PARAM, alpha_ptr=PARAM, out_ptr=pointer,
                         src_desc=f"tensordesc<{scalar}[1,{ce['BD']},{ce['BH']},{ce['BW']},{ce['BLOCK_K']}]>",
                         w_desc=f"tensordesc<{scalar}[{ce['BLOCK_K']},{ce['BLOCK_N']}]>",
                         phase_ptr="*i64", o_sn="i64", r_sn="i64")
            rows += check("conv_tma", name, dname, conv._conv_tma_kernel, types, dict(ce, DOT_PREC=prec),
                          args.all_configs, args.only)
        for name, ce in WGRAD_TMA if size == 2 else ():
            scalar = pointer[1:]
            box = f"1,{ce['BD']},{ce['BH']},{ce['BW']}"
            types = {"x_desc": f"tensordesc<{scalar}[{box},{ce['BLOCK_K']}]>",
                     "dz_desc": f"tensordesc<{scalar}[{box},{ce['BLOCK_N']}]>", "dw_part_ptr": "*fp32"}
            rows += check("wgrad_tma", name, dname, conv._wgrad_tma_kernel, types, dict(ce, DOT_PREC=prec),
                          args.all_configs, args.only)
        for name, ce in WGRAD:
            types = {p: pointer for p in WGRAD_POINTERS}
            types.update({p: "*fp32" for p in ("dw_part_ptr", "db_part_ptr", "da_part_ptr")}, alpha_ptr=PARAM,
                         taps_ptr="*i32")
            rows += check("wgrad", name, dname, conv._wgrad_kernel, types,
                          dict(ce, DOT_PREC=prec, VEC=_vec(ce, pointer), VEC_OUT=min(16 // size, ce["BLOCK_CO"])),
                          args.all_configs, args.only, narrow=ce["FLAT_K"] or name.endswith("c8"))
        if prec == "ieee":
            continue  # exact fp32 weight gradients take _wgrad_kernel (the GEMM kernel's tiles spill without MMA)
        for name, ce in WGRAD_GEMM:
            types = {"x_ptr": pointer, "dz_ptr": pointer, "dw_part_ptr": "*fp32"}
            vec = 16 // size  # 8 channels, or runs of 16 bytes
            rows += check("wgrad_gemm", name, dname, conv._wgrad_gemm_kernel, types,
                          dict(ce, DOT_PREC=prec, VEC=vec, VEC_OUT=vec), args.all_configs, args.only,
                          narrow=name.startswith("c8"))
    # the loss kernels as the launcher specializes them: NCDHW logits (class stride divisible by 16, spatial stride 1)
    # and channels-last ones (class stride 1); a target of class probabilities in the logits' layout
    jaccard_layouts = (("", True, {"l_sn", "l_sc", "t_sn", "t_sc", "S"}), ("_cl", False, {"l_sn", "l_ss", "t_sn", "t_ss"}))
    for label, softmax, target in ((True, True, "*u8"), (True, False, "*i64"), (False, True, "*fp32")):
        for (layout, unit, div16), block_c in itertools.product(jaccard_layouts, (8, 64)):
            types = {"logit_ptr": "*bf16", "tgt_ptr": target, "part_ptr": "*fp32", "gsum_ptr": "*fp32",
                     "grad_ptr": "*bf16", "range_ptr": "*i64", "w_ptr": "*fp32", "gloss_ptr": "*fp32",
                     "smooth": "fp32", "ignore_index": "i64"}
            block_s, vec = jaccard.tile_shape(block_c, unit)
            ce = dict(TARGET_IS_LABEL=label, SOFTMAX=softmax, SQUARED=True, HAS_IGNORE=label, BLOCK_C=block_c,
                      BLOCK_S=block_s, VEC=vec, L_UNIT=unit, T_UNIT=unit or label)
            ce.update({"l_ss": 1} if unit else {"l_sc": 1})
            if label:
                ce.update(t_sc=0, t_ss=1)  # (a label map has no class stride: the launcher passes 0)
            else:
                ce.update({"t_ss": 1} if unit else {"t_sc": 1})
            variant = f"{'label' if label else 'probs'}_{'softmax' if softmax else 'sigmoid'}_C{block_c}{layout}"
            # the sums with the label range of the fused loss; the backward from the loss (the fused loss's, which
            # does more than the one from given dL/d(sums))
            rows += check("jaccard_sums", variant, "bf16", jaccard._jaccard_sums_kernel, types,
                          dict(ce, LABEL_RANGE=label), False, args.only, jaccard.NUM_WARPS, div16=div16)
            rows += check("jaccard_bwd", variant, "bf16", jaccard._jaccard_backward_kernel, types,
                          dict(ce, FROM_LOSS=True, PER_SAMPLE=False, MEAN=True), False, args.only, jaccard.NUM_WARPS,
                          div16=div16)
    # per sample, and pooled (which also stores the pooled row N: N = 1 is a constant in the launcher's specialization)
    loss_variants = (("", dict(PER_SAMPLE=True)), ("_pooled", dict(PER_SAMPLE=False)),
                     ("_pooled_n1", dict(PER_SAMPLE=False, N=1)))
    for block_c, (name, pooling) in itertools.product((8, 64), loss_variants):
        types = {"part_ptr": "*fp32", "range_part_ptr": "*i64", "w_ptr": "*fp32", "sums_ptr": "*fp32",
                 "loss_ptr": "*fp32", "range_ptr": "*i64", "smooth": "fp32"}
        ce = dict(pooling, MEAN=True, LABEL_RANGE=True, BLOCK_C=block_c,
                  BLOCK_B=jaccard.loss_block_rows(block_c, jaccard.MAX_PROGRAMS))
        rows += check("jaccard_loss", f"C{block_c}{name}", "fp32", jaccard._jaccard_loss_kernel, types, ce, False,
                      args.only, jaccard._LOSS_WARPS)
    # the backward's second stage (split sums of the weight, bias and alpha gradients; shared alpha)
    types = {p: "*fp32" for p in ("dw_part_ptr", "db_part_ptr", "da_part_ptr")}
    types.update(gw_ptr=PARAM, gb_ptr=PARAM, ga_ptr=PARAM)
    for layout, channels_last in (("bias_shared_alpha", False), ("channels_last_weight", True)):
        rows += check("finish", layout, "bf16", conv._finish_kernel, types,
                      dict(HAS_B=True, HAS_A=True, SHARED_ALPHA=True, W_CHANNELS_LAST=channels_last,
                           BLOCK=conv._FINISH_BLOCK, SPLIT_BLOCK=conv._FINISH_SPLITS), False, args.only)
    # the upsampling block (transposed conv k2 s2): forward, and the backward's two kernels, at the network's channel
    # counts (8, 16, 32; wider blocks run on the reference backend)
    for dname, pointer, prec in DTYPES[:3]:
        for c in (8, 16, 32):
            block = max(16, c)
            types = {p: pointer for p in ("x_ptr", "skip_ptr", "out_ptr", "g_ptr", "gx_ptr")}
            types.update(w_ptr=PARAM, b_ptr=PARAM, a_ptr=PARAM, db_ptr="*fp32", da_ptr="*fp32", dw_ptr="*fp32")
            flags = dict(HAS_BIAS=True, ALPHA_PER_CH=True, DOT_PREC=prec)
            narrow = c % 16 != 0
            rows += check("upconv_fwd", f"c{c}", dname, upconv._upconv_fwd_kernel, types,
                          dict(flags, HAS_SKIP=True, BLOCK_N=block, BLOCK_K=min(block, 64)), args.all_configs,
                          args.only, narrow=narrow)
            rows += check("upconv_dgrad", f"c{c}", dname, upconv._upconv_dgrad_kernel, types,
                          dict(flags, WANT_X=True, WANT_B=True, WANT_A=True, BLOCK_CI=block, BLOCK_CO=block),
                          args.all_configs, args.only, narrow=narrow)
            rows += check("upconv_wgrad", f"c{c}", dname, upconv._upconv_wgrad_kernel, types,
                          dict(flags, BLOCK_CI=block, BLOCK_CO=block), args.all_configs, args.only, narrow=narrow)
    failed = [r["kernel"] for r in rows if not r["ok"] or not r["smem_ok"]]
    spills = [r["kernel"] for r in rows if r.get("spill_st")]
    print(json.dumps(dict(summary=True, triton=triton.__version__, torch=torch.__version__, target="sm_90",
                          date=datetime.date.today().isoformat(), compiled=len(rows) - len(failed), failed=failed,
                          spilling=spills)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
