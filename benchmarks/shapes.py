"""What the benchmarks measure: the conv layer shapes of Seg3DNet and the Jaccard loss, with their minimal cost.

Conv shapes are read off the network itself (forward pre-hooks on every ConvPReLU3d) at the paper's crop
1x4x128x160x144, for the base network (features 8/16/32/64) and a wide one (32/64/128/256); identical shapes are
measured once. On a CPU the same code runs at a tiny input with scaled-down features so that CI exercises the suite.

Minimal cost (for TFLOP/s, GB/s and the floor; DESIGN.md "Ceilings"): M = N*D'*H'*W' output voxels, K = C_in*k^3.
  forward : 2*M*C_out*K FLOPs; bytes = x + weight + (residual) + out, each once.
  backward: 4*M*C_out*K FLOPs (input and weight gradients); bytes = grad_out + x + saved activation
            (the PReLU output, to recover the pre-activation) + grad_x + weight + grad_weight, and with the
            residual summed before the PReLU its gradient dz (written: it is not grad_out).
  both    : the sum of the two.
Jaccard loss at C classes over V voxels: forward reads logits and labels once (5 FLOPs per logit: exp,
normalise, three sums); backward reads them again and writes the logits' gradient (6 FLOPs per logit).
Upsampling block (transposed conv k2 s2 + PReLU + skip) from M = N*D*H*W input voxels: forward 2*M*8*C_out*C_in
FLOPs, bytes = x + weight + skip + out; backward twice the FLOPs, bytes = grad_out + x + grad_x + weight + grad_weight
(z is recomputed).
"""
import os
from dataclasses import dataclass, field

import torch

FULL_INPUT = (1, 4, 128, 160, 144)   # the paper's BRATS crop
TINY_INPUT = (1, 4, 16, 20, 18)      # CPU: the plumbing at a size the interpreter can run
NETWORKS = {"base": (8, 16, 32, 64), "wide": (32, 64, 128, 256)}
TINY_NETWORKS = {"base": (2, 4, 6, 8)}
NUM_CLASSES = 5
DIRECTIONS = ("forward", "backward", "both")


@dataclass(frozen=True)
class ConvCase:
    n: int
    c_in: int
    c_out: int
    spatial: tuple          # input (D, H, W)
    k: int
    stride: int
    residual: bool
    residual_first: bool
    prelu: bool
    layers: tuple = field(default=(), compare=False)  # "<net>.<module name>" where this shape occurs

    @property
    def out_spatial(self):
        return tuple((s + 2 * (self.k // 2) - self.k) // self.stride + 1 for s in self.spatial)

    @property
    def name(self):
        d, h, w = self.spatial
        tail = ("_res1st" if self.residual_first else "_res") if self.residual else ""
        act = "" if self.prelu else "_noact"
        return f"c{self.c_in}-{self.c_out}_k{self.k}s{self.stride}_{d}x{h}x{w}{tail}{act}"

    def shape(self):
        """The record's shape field."""
        return {"N": self.n, "C_in": self.c_in, "C_out": self.c_out, "DHW": list(self.spatial), "k": self.k,
                "stride": self.stride, "residual": self.residual, "residual_first": self.residual_first,
                "prelu": self.prelu}

    def flops(self, direction):
        m = self.n * _prod(self.out_spatial)
        one = 2 * m * self.c_out * self.c_in * self.k**3
        return {"forward": one, "backward": 2 * one, "both": 3 * one}[direction]

    def min_bytes(self, direction, itemsize):
        x = self.n * self.c_in * _prod(self.spatial)
        y = self.n * self.c_out * _prod(self.out_spatial)
        w = self.c_out * self.c_in * self.k**3
        fwd = x + w + y + (y if self.residual else 0)
        # residual summed before the PReLU: its gradient is dz = grad_out * prelu'(z), an output of its own (after
        # the PReLU, or with no activation, it is grad_out itself)
        grad_residual = y if self.residual and self.residual_first and self.prelu else 0
        bwd = y + x + (y if self.prelu else 0) + x + 2 * w + grad_residual
        return itemsize * {"forward": fwd, "backward": bwd, "both": fwd + bwd}[direction]


# The shapes Triton's CPU interpreter runs in the CPU suite: odd extents, residual after the PReLU (gathered-load
# kernel); 16 channels, residual first (triton_tma runs it on the TMA kernel).
INTERPRETER_CASE = ConvCase(n=1, c_in=2, c_out=3, spatial=(5, 6, 7), k=3, stride=1, residual=True,
                            residual_first=False, prelu=True, layers=("interpreter",))
INTERPRETER_TMA_CASE = ConvCase(n=1, c_in=16, c_out=16, spatial=(3, 4, 5), k=3, stride=1, residual=True,
                                residual_first=True, prelu=True, layers=("interpreter_tma",))


@dataclass(frozen=True)
class JaccardCase:
    n: int
    classes: int
    spatial: tuple

    @property
    def name(self):
        d, h, w = self.spatial
        return f"jaccard_c{self.classes}_{d}x{h}x{w}"

    def shape(self):
        return {"N": self.n, "C": self.classes, "DHW": list(self.spatial)}

    def flops(self, direction):
        logits = self.n * self.classes * _prod(self.spatial)
        return {"forward": 5 * logits, "backward": 6 * logits, "both": 11 * logits}[direction]

    def min_bytes(self, direction, itemsize, label_itemsize=8):
        logits = self.n * self.classes * _prod(self.spatial) * itemsize
        labels = self.n * _prod(self.spatial) * label_itemsize
        fwd = logits + labels
        bwd = 2 * logits + labels
        return {"forward": fwd, "backward": bwd, "both": fwd + bwd}[direction]


@dataclass(frozen=True)
class UpconvCase:
    n: int
    c_in: int
    c_out: int
    spatial: tuple          # input (D, H, W); the output is twice each
    layers: tuple = field(default=(), compare=False)

    @property
    def name(self):
        d, h, w = self.spatial
        return f"upconv_c{self.c_in}-{self.c_out}_{d}x{h}x{w}"

    def shape(self):
        return {"N": self.n, "C_in": self.c_in, "C_out": self.c_out, "DHW": list(self.spatial)}

    def flops(self, direction):
        one = 2 * self.n * _prod(self.spatial) * 8 * self.c_out * self.c_in
        return {"forward": one, "backward": 2 * one, "both": 3 * one}[direction]

    def min_bytes(self, direction, itemsize):
        x = self.n * self.c_in * _prod(self.spatial)
        y = 8 * self.n * self.c_out * _prod(self.spatial)
        w = 8 * self.c_in * self.c_out
        fwd, bwd = x + w + 2 * y, y + 2 * x + 2 * w
        return itemsize * {"forward": fwd, "backward": bwd, "both": fwd + bwd}[direction]


def network_upconv_cases(tiny):
    """The upsampling blocks of the benchmark networks (UpConvPReLU3d: input shape from a meta-device forward)."""
    from seg3d_fast.models import Seg3DNet
    from seg3d_fast.nn import UpConvPReLU3d

    input_shape = TINY_INPUT if tiny else FULL_INPUT
    cases = {}
    for net, features in (TINY_NETWORKS if tiny else NETWORKS).items():
        model = Seg3DNet(in_channels=input_shape[1], num_classes=NUM_CLASSES, features=features, fused=True)
        seen = []
        handles = [m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, m, args[0].shape)))
                   for name, m in model.named_modules() if isinstance(m, UpConvPReLU3d)]
        try:
            with torch.no_grad():
                model.to("meta")(torch.randn(input_shape, device="meta"))
        finally:
            for h in handles:
                h.remove()
        for name, m, shape in seen:
            case = UpconvCase(n=shape[0], c_in=m.in_channels, c_out=m.out_channels, spatial=tuple(shape[2:]))
            first = cases.get(case, case)
            cases[case] = UpconvCase(**{**first.__dict__, "layers": first.layers + (f"{net}.{name}",)})
    return list(cases.values())


def _prod(values):
    out = 1
    for v in values:
        out *= v
    return out


def conv_cases_of(model, input_shape):
    """Conv shapes of `model` (ConvPReLU3d layers) seen in one forward at `input_shape`, in call order
    (run on the meta device: shapes only, no memory, no arithmetic)."""
    from seg3d_fast.nn import ConvPReLU3d

    seen = []

    def hook(module, args, kwargs):
        x = args[0]
        residual = args[1] if len(args) > 1 else kwargs.get("residual")
        seen.append(ConvCase(
            n=x.shape[0], c_in=module.in_channels, c_out=module.out_channels, spatial=tuple(x.shape[2:]),
            k=_int(module.kernel_size), stride=_int(module.stride), residual=residual is not None,
            residual_first=bool(module.residual_first), prelu=getattr(module, "alpha", None) is not None,
            layers=(module._bench_name,)))

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ConvPReLU3d):
            module._bench_name = name
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model = model.to("meta")
        with torch.no_grad():
            model(torch.randn(input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return seen


def _int(v):
    return v[0] if isinstance(v, (tuple, list)) else int(v)


def dedupe(cases):
    """Merge identical shapes (keeping the first, with every layer name it stands for)."""
    merged = {}
    for c in cases:
        if c in merged:
            first = merged[c]
            merged[c] = ConvCase(**{**first.__dict__, "layers": first.layers + c.layers})
        else:
            merged[c] = c
    return list(merged.values())


def network_conv_cases(tiny):
    """Deduplicated conv shapes of the benchmark networks (tiny: the CPU sizes)."""
    from seg3d_fast.models import Seg3DNet

    input_shape = TINY_INPUT if tiny else FULL_INPUT
    cases = []
    for net, features in (TINY_NETWORKS if tiny else NETWORKS).items():
        torch.manual_seed(0)
        model = Seg3DNet(in_channels=input_shape[1], num_classes=NUM_CLASSES, features=features, fused=True)
        for c in conv_cases_of(model, input_shape):
            cases.append(ConvCase(**{**c.__dict__, "layers": tuple(f"{net}.{n}" for n in c.layers)}))
        del model
    return dedupe(cases)


def representative(cases):
    """A few layers that stand for the rest (measured in every dtype): the heaviest plain 3x3 stride-1 layer, the
    heaviest stride-2 layer, the heaviest residual layer, the lightest full-resolution 3x3 layer (memory bound)
    and the heaviest 1x1 layer."""
    def heaviest(pool):
        return max(pool, key=lambda c: c.flops("forward")) if pool else None

    k3 = [c for c in cases if c.k == 3]
    full = max((_prod(c.spatial) for c in k3), default=0)
    picks = [
        heaviest([c for c in k3 if c.stride == 1 and not c.residual]),
        heaviest([c for c in k3 if c.stride == 2]),
        heaviest([c for c in k3 if c.residual]),
        min((c for c in k3 if c.stride == 1 and _prod(c.spatial) == full), key=lambda c: c.flops("forward"),
            default=None),
        heaviest([c for c in cases if c.k == 1]),
    ]
    out = []
    for c in picks:
        if c is not None and c not in out:
            out.append(c)
    return out


def jaccard_case(tiny):
    shape = TINY_INPUT if tiny else FULL_INPUT
    return JaccardCase(n=shape[0], classes=NUM_CLASSES, spatial=tuple(shape[2:]))


def env_list(name, default):
    """Comma-separated env var, or the default list."""
    value = os.environ.get(name)
    return [v.strip() for v in value.split(",") if v.strip()] if value else list(default)


# ---------------------------------------------------------------------------------------------------------------------
# which rows run (the env vars are described in conftest.py)
def _on_gpu():
    return torch.cuda.is_available()


def _settings():
    gpu = _on_gpu()
    return {
        "tiny": os.environ.get("SEG3D_BENCH_SIZE", "full" if gpu else "tiny") == "tiny",
        "layers": os.environ.get("SEG3D_BENCH_LAYERS", "all" if gpu else "representative"),
        "dtypes": env_list("SEG3D_BENCH_DTYPES", ["bf16"] if gpu else ["fp32"]),
        "rep_dtypes": env_list("SEG3D_BENCH_REP_DTYPES", ["fp32", "fp16", "bf16"] if gpu else ["fp32"]),
        "backends": env_list("SEG3D_BENCH_BACKENDS",
                             ["eager", "eager_cl", "compile", "triton", "triton_tma", "cuda"] if gpu
                             else ["eager", "eager_cl", "reference", "triton"]),
        "compile": os.environ.get("SEG3D_BENCH_COMPILE", "representative"),
        "directions": env_list("SEG3D_BENCH_DIRECTIONS", DIRECTIONS),
        "gpu": gpu,
    }


def all_rows():
    """Every row in run order, so that the figures that matter most survive a time limit: the loss, the
    representative conv layers, torch.compile's forward of the heaviest one and of the loss (the Triton issue's
    forward target; each takes seconds to compile), the upsampling blocks, the other conv layers, then the rest of
    torch.compile."""
    loss, loss_compiled = jaccard_rows()
    reps, others, conv_compiled = conv_rows()
    early = [r for r in conv_compiled if r[2] == "forward"][:1] + [r for r in loss_compiled if r[2] == "forward"][:1]
    return loss + reps + early + upconv_rows() + others + [r for r in conv_compiled + loss_compiled if r not in early]


def upconv_rows():
    """The upsampling blocks in the every-layer dtypes: cuDNN's transposed conv (both layouts) beside the fused
    blocks (triton; the cuda backend has none)."""
    s = _settings()
    rows = []
    # blocks over 32 channels have no fused kernel (backends/triton/upconv.py MAX_CHANNELS): nothing to compare
    for case in (c for c in network_upconv_cases(s["tiny"]) if max(c.c_in, c.c_out) <= 32):
        for dtype in s["dtypes"]:
            for direction in s["directions"]:
                for backend in s["backends"]:
                    if backend in ("compile", "triton_tma", "cuda") or (backend == "triton" and not s["gpu"]):
                        continue  # (the interpreter: tests/test_triton_backend.py runs the kernels on the CPU)
                    rows.append((case, dtype, direction, backend))
    return rows


def conv_rows():
    """-> (representative layers' rows, other layers' rows, torch.compile rows) of (case, dtype, direction,
    backend), each in run order: the representative layers in every dtype, the other layers heaviest first;
    baselines before the fused backends."""
    s = _settings()
    cases = network_conv_cases(s["tiny"])
    reps = representative(cases)
    others = [c for c in cases if c not in reps] if s["layers"] == "all" else []
    others.sort(key=lambda c: -c.flops("forward"))  # heaviest first: they dominate the network's time
    compiled = []

    def layer_rows(case, is_rep):
        rows = []
        dtypes = list(dict.fromkeys(s["rep_dtypes"] + s["dtypes"])) if is_rep else s["dtypes"]
        for dtype in dtypes:
            for direction in s["directions"]:
                for backend in s["backends"]:
                    if backend == "compile":  # compiling takes seconds per shape and dtype: few, and late
                        if s["compile"] == "all" or (is_rep and dtype == "bf16"):
                            compiled.append((case, dtype, direction, backend))
                        continue
                    if backend.startswith("triton") and not s["gpu"]:
                        continue  # the interpreter is slow: INTERPRETER_CASE below exercises it
                    if backend == "triton_tma" and (dtype != "bf16" or not is_rep
                                                     or (case.stride != 1 and direction == "forward")):
                        continue  # A/B of the TMA kernel (stride-1 convs, stride-2 dgrad): representative, bf16
                    rows.append((case, dtype, direction, backend))
        return rows

    rep_rows = [row for case in reps for row in layer_rows(case, True)]
    other_rows = [row for case in others for row in layer_rows(case, False)]
    if not s["gpu"] and "triton" in s["backends"]:
        other_rows += [(INTERPRETER_CASE, s["dtypes"][0], direction, backend) for direction in s["directions"]
                       for backend in ("eager", "triton")]
        other_rows += [(INTERPRETER_TMA_CASE, "bf16", direction, backend) for direction in s["directions"]
                       for backend in ("eager", "triton", "triton_tma")]  # (the TMA kernels take fp16/bf16)
    return rep_rows, other_rows, compiled


def jaccard_rows():
    """-> (rows, torch.compile rows) for the loss (NCDHW logits for every backend: no eager_cl)."""
    s = _settings()
    case = jaccard_case(s["tiny"])
    rows, compiled = [], []
    for dtype in s["rep_dtypes"]:
        for direction in s["directions"]:
            for backend in s["backends"]:
                if backend == "compile":
                    if dtype == "bf16" or s["compile"] == "all":
                        compiled.append((case, dtype, direction, backend))
                elif backend not in ("eager_cl", "triton_tma"):
                    rows.append((case, dtype, direction, backend))
    return rows, compiled


def row_id(row):
    case, dtype, direction, backend = row
    return f"{case.name}-{dtype}-{direction}-{backend}"
