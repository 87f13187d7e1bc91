"""Results files -> markdown tables, a PNG chart, and the short summary gpu_check.sh prints last.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--markdown OUT.md] [--png OUT.png] [--summary]
                                [--dispatch-table seg3d_fast/backends/dispatch_table.json]

Takes any of the three kinds of results file: "benchmarks" (pytest suite), "profile" and "cpu_memory"
(seg3d_fast.profile). Markdown goes to stdout unless --markdown names a file; --summary prints only the short form.
"""
import argparse
import json
import math
import sys
from pathlib import Path

ORDER = ("eager", "eager_cl", "compile", "reference", "triton", "triton_tma", "cuda")
FUSED = ("triton", "cuda", "reference")


def load(path):
    return json.loads(Path(path).read_text())


def _rows(records):
    """{(op, name, dtype, direction): {backend: record}} in first-seen order."""
    rows = {}
    for r in records:
        rows.setdefault((r["op"], r["name"], r["dtype"], r["direction"]), {})[r["backend"]] = r
    return rows


def _backends(records):
    present = {r["backend"] for r in records}
    return [b for b in ORDER if b in present] + sorted(present - set(ORDER))


def _fmt(v, spec, none="–"):
    return none if v is None else format(v, spec)


def _gmean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def environment_line(env, ceilings=None):
    parts = [env.get("device"), f"driver {env.get('driver')}", f"torch {env.get('torch')}",
             f"CUDA {env.get('cuda')}", f"cuDNN {env.get('cudnn')}", f"Triton {env.get('triton')}", env.get("date")]
    line = ", ".join(str(p) for p in parts if p)
    if ceilings:
        line += (f". Measured ceilings: bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s, fp32 matmul "
                 f"{ceilings['fp32_tflops']:.0f} TFLOP/s{' (TF32)' if ceilings.get('fp32_uses_tf32') else ''}, "
                 f"copy {ceilings['copy_gbps']:.0f} GB/s (read + write)")
    return line


def benchmark_markdown(payload):
    """One table per op: a row per (shape, dtype, direction), a column per backend with
    `ms · speed-up vs cuDNN · fraction of floor`, and the peak memory of the best baseline and best fused backend."""
    records = payload["records"]
    backends = _backends(records)
    out = [f"_{environment_line(payload['environment'], payload.get('ceilings'))}._", ""]
    out.append("Cells: median ms · speed-up over the faster cuDNN layout · fraction of the floor "
               "max(FLOPs / matmul rate, bytes / copy bandwidth). (q …): the device time with the launch queue kept "
               "full, where it is under 0.8× the median: that row runs at the host's pace. (g …): the same for the "
               "calls replayed from a CUDA graph. Peak: extra memory of one call, MiB.")
    for op in dict.fromkeys(r["op"] for r in records):
        out += ["", f"#### {op}", "",
                "| shape | dtype | direction | " + " | ".join(backends) + " | peak MiB cuDNN → fused |",
                "|---" * (4 + len(backends)) + "|"]
        for (o, name, dtype, direction), by in _rows(records).items():
            if o != op:
                continue
            cells = []
            for b in backends:
                r = by.get(b)
                if r is None or r["ms"] is None:
                    cells.append("–")
                    continue
                cell = f"{r['ms']:.3g}"
                if r.get("ms_queued") and r["ms_queued"] < 0.8 * r["ms"]:
                    cell += f" (q {r['ms_queued']:.3g})"
                if r.get("ms_graph") and r["ms_graph"] < 0.8 * r["ms"]:
                    cell += f" (g {r['ms_graph']:.3g})"
                if b not in ("eager", "eager_cl") and r["speedup_vs_cudnn"]:
                    cell += f" · {r['speedup_vs_cudnn']:.2f}×"
                if r["fraction_of_floor"] is not None:
                    cell += f" · {100 * r['fraction_of_floor']:.0f}%"
                cells.append(cell)
            base = [by[b] for b in ("eager", "eager_cl") if b in by and by[b]["ms"]]
            fused = [by[b] for b in FUSED if b in by and by[b]["ms"]]
            peak_base = min(base, key=lambda r: r["ms"])["peak_bytes"] if base else None
            peak_fused = min(fused, key=lambda r: r["ms"])["peak_bytes"] if fused else None
            peak = " → ".join(_fmt(p and p / 2**20, ".0f") for p in (peak_base, peak_fused))
            out.append(f"| {name} | {dtype} | {direction} | " + " | ".join(cells) + f" | {peak} |")
    out += ["", "#### Geometric-mean speed-up over cuDNN (all measured shapes)", ""]
    out += _gmean_table(records)
    if any(r.get("speedup_graph_vs_cudnn") for r in records):
        out += ["", "#### The same, every side replayed from CUDA graphs (kernels only: no host work, no "
                "synchronization inside a call)", ""]
        out += _gmean_table(records, GRAPH_SPEEDUP)
    return "\n".join(out)


GRAPH_SPEEDUP = "speedup_graph_vs_cudnn"


def _speedups(records, field):
    """{(op, dtype, direction): {backend: {shape name: speed-up}}} of the fused backends' records that have `field`."""
    groups = {}
    for r in records:
        if r["backend"] not in ("eager", "eager_cl") and r.get(field):
            groups.setdefault((r["op"], r["dtype"], r["direction"]), {}).setdefault(r["backend"], {})[r["name"]] = \
                r[field]
    return groups


def _gmeans(records, field="speedup_vs_cudnn"):
    """{(op, dtype, direction): {backend: (geometric-mean speed-up over cuDNN, number of shapes)}}; field: the
    records' speed-up (speedup_vs_cudnn, or GRAPH_SPEEDUP of their CUDA-graph replays)."""
    order = _backends(records)
    return {k: {b: (_gmean(list(by[b].values())), len(by[b])) for b in order if b in by}
            for k, by in _speedups(records, field).items()}


def _gmean_table(records, field="speedup_vs_cudnn"):
    backends = [b for b in _backends(records) if b not in ("eager", "eager_cl")]
    lines = ["| op | dtype | direction | " + " | ".join(backends) + " |", "|---" * (3 + len(backends)) + "|"]
    for (op, dtype, direction), by in _gmeans(records, field).items():
        cells = [f"{by[b][0]:.2f}× (n={by[b][1]})" if b in by else "–" for b in backends]
        lines.append(f"| {op} | {dtype} | {direction} | " + " | ".join(cells) + " |")
    same = _same_shape_gmeans(records, field)
    if same:
        lines += ["", "Where a backend measured fewer shapes than its group (opt-in or representative-only variants, "
                  "rows cut by the time limit), its mean is not comparable with the others': the backends on the same "
                  "shapes:", ""]
        lines += [f"- {line}" for line in same]
    return lines


def _same_shape_gmeans(records, field="speedup_vs_cudnn"):
    """For each (op, dtype, direction) and each backend that measured only some of the group's shapes: every
    backend's geometric-mean speed-up over exactly those shapes (each that measured them all), as text lines."""
    order = _backends(records)
    lines = []
    for (op, dtype, direction), by in _speedups(records, field).items():
        shapes = set().union(*by.values())
        for b in (b for b in order if b in by and len(by[b]) < len(shapes)):
            subset = set(by[b])
            cells = [f"{c} {_gmean([by[c][n] for n in subset]):.2f}×" for c in order
                     if c in by and subset <= set(by[c])]
            lines.append(f"{op} {dtype} {direction}, on the {len(subset)} shape{'s' * (len(subset) > 1)} {b} "
                         f"measured: " + ", ".join(cells))
    return lines


def profile_markdown(payload):
    c = payload["config"]
    shape = f"{c['batch']}x{c['in_channels']}x" + "x".join(map(str, c["input_size"]))
    out = [f"_{environment_line(payload['environment'])}._", "",
           f"Seg3DNet features {tuple(c['features'])}, input {shape}, {c['dtype']}, Adam; largest cube in "
           f"{c['memory_budget']:g} GiB.", "",
           "| variant | ms/step | host ms | GPU busy ms | steps/s | Mvoxels/s | speed-up | back-to-back ms/step "
           "(speed-up) | peak GiB | memory vs plain | step tensors GiB | largest cube |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        edge = r.get("max_cubic_edge")
        peak = _fmt(r["peak_bytes"] and r["peak_bytes"] / 2**30, ".2f")
        tensors = _fmt(r.get("step_tensor_peak_bytes") and r["step_tensor_peak_bytes"] / 2**30, ".2f")
        out.append(f"| {r['variant']} | {r['step_ms']:.1f} | {_fmt(r.get('host_ms'), '.1f')} | "
                   f"{_fmt(r.get('gpu_busy_ms'), '.1f')} | {r['steps_per_s']:.2f} | {r['voxels_per_s'] / 1e6:.1f} | "
                   f"{_fmt(r.get('speedup_vs_plain'), '.2f')}× | {_fmt(r.get('back_to_back_ms'), '.1f')} "
                   f"({_fmt(r.get('back_to_back_speedup_vs_plain'), '.2f')}×) | {peak} | "
                   f"{_fmt(r.get('memory_vs_plain'), '.2f')} | "
                   f"{tensors} | {f'{edge}³' if edge else '–'} |")
    methods = {r.get("memory_method") for r in payload["results"]} | {r.get("max_cubic_method")
                                                                      for r in payload["results"]}
    out += ["", "ms/step: one step, waited for before and after. Back-to-back: steps with no wait between them, as "
            "a training loop runs them. Host ms: the time until a step's call returns, its GPU work still queued (near "
            "ms/step: the step runs at the host's pace). GPU busy ms: the GPU's kernel and copy time per step (torch.profiler, "
            "--trace). Memory: " + "; ".join(sorted(m for m in methods if m)) + ". Step tensors: the peak of the "
            "tensors one forward + backward allocates (activations, gradients, temporaries; no workspaces or "
            "allocator rounding)."]
    chosen = [(r["variant"], r["backends"]) for r in payload["results"] if r.get("backends")]
    if chosen:
        from seg3d_fast.profile import describe_backends

        out += ["", "Backends the fused layers ran on (distinct layer shapes): " + " | ".join(
            f"{variant}: {describe_backends(backends)}" for variant, backends in chosen) + "."]
    for r in payload["results"]:
        if r.get("peak_allocations"):
            p = r["peak_allocations"]
            out += ["", f"Allocated at {r['variant']}'s step peak ({p['peak_bytes'] / 2**20:.0f} MiB above the step's "
                    "start; by allocating line): " + "; ".join(f"{t['bytes'] / 2**20:.1f} MiB ×{t['count']} "
                                                              f"`{t['where']}`" for t in p["top"]) + "."]
    return "\n".join(out)


def cpu_memory_markdown(payload):
    r, c = payload["result"], payload["config"]
    return "\n".join([
        f"_{environment_line(payload['environment'])}._", "",
        f"Seg3DNet {tuple(c['features'])} at {'x'.join(map(str, c['input']))}, fp32, CPU: fused (reference backend) "
        "vs plain eager PyTorch.", "",
        "| figure | fused | plain | ratio | target |", "|---|---|---|---|---|",
        f"| saved for backward (MiB) | {r['saved_bytes_fused'] / 2**20:,.1f} | {r['saved_bytes_plain'] / 2**20:,.1f} | "
        f"{r['saved_bytes_ratio']:.3f} | ≤ {r['saved_bytes_target']} |",
        f"| training step, median CPU time (ms) | {r['step_cpu_ms_fused']:,.0f} | {r['step_cpu_ms_plain']:,.0f} | "
        f"{r['step_time_ratio']:.3f} | ≤ {r['step_time_target']} |",
        "", f"Wall-clock ratio: {r['wall_ratio_median']:.3f} (median steps), {r['wall_ratio_fastest']:.3f} (fastest "
        f"steps); {c.get('threads')} threads, load average {c.get('load_average')}."])


def markdown(payload):
    return {"benchmarks": benchmark_markdown, "profile": profile_markdown,
            "cpu_memory": cpu_memory_markdown}[payload["kind"]](payload)


def summary(payload, dtype="bf16", direction="both"):
    """Short plain-text form: speed-ups per layer and backend (one dtype and direction), ceilings, geomeans."""
    if payload["kind"] != "benchmarks":
        return markdown(payload)
    records = payload["records"]
    c = payload.get("ceilings") or {}
    lines = [environment_line(payload["environment"], c or None)]
    chosen = [r for r in records if r["dtype"] == dtype and r["direction"] == direction]
    backends = [b for b in _backends(chosen) if b not in ("eager", "eager_cl")]
    lines.append(f"speed-up over cuDNN (best layout), {dtype} {direction}; [fraction of floor]")
    lines.append(f"{'shape':<36}{'cuDNN ms':>10}" + "".join(f"{b:>18}" for b in backends))
    for (op, name, _, _), by in _rows(chosen).items():
        base = [by[b]["ms"] for b in ("eager", "eager_cl") if b in by and by[b]["ms"]]
        cells = []
        for b in backends:
            r = by.get(b)
            if r is None or not r["ms"] or not r["speedup_vs_cudnn"]:
                cells.append(f"{'–':>18}")
            else:
                frac = r["fraction_of_floor"]
                cells.append(f"{r['speedup_vs_cudnn']:>9.2f}× [{_fmt(frac and 100 * frac, '3.0f')}%]")
        lines.append(f"{name[:35]:<36}{_fmt(min(base) if base else None, '10.3f'):>10}" + "".join(cells))
    for field, title in (("speedup_vs_cudnn", ""), (GRAPH_SPEEDUP, ", every side replayed from CUDA graphs")):
        gmeans = _gmeans(records, field)
        if gmeans:
            lines.append(f"geometric-mean speed-up over cuDNN{title}, all measured shapes (n shapes):")
        for (op, dtype, direction), by in gmeans.items():
            cells = "".join(f"{b:>10} {g:5.2f}× (n={n})" for b, (g, n) in by.items())
            lines.append(f"  {op:<13}{dtype:<5}{direction:<9}{cells}")
        lines += [f"    {line}" for line in _same_shape_gmeans(records, field)]
    return "\n".join(lines)


def chart(payload, path, dtype="bf16", direction="both"):
    """Horizontal bars: speed-up over cuDNN per shape for each non-baseline backend (one dtype and direction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if payload["kind"] != "benchmarks":
        raise ValueError("the chart is drawn from a benchmarks results file (profile writes its own)")
    chosen = [r for r in payload["records"] if r["dtype"] == dtype and r["direction"] == direction]
    if not chosen:  # e.g. a CPU run in fp32: draw what there is
        dtype = payload["records"][0]["dtype"]
        chosen = [r for r in payload["records"] if r["dtype"] == dtype and r["direction"] == direction]
    rows = _rows(chosen)
    backends = [b for b in _backends(chosen) if b not in ("eager", "eager_cl")]
    names = [name for (_, name, _, _) in rows]
    height = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(names) * max(1, len(backends) / 2)))
    for i, b in enumerate(backends):
        ys = [j + i * height for j in range(len(names))]
        xs = [(by.get(b) or {}).get("speedup_vs_cudnn") or 0 for by in rows.values()]
        ax.barh(ys, xs, height=height, label=b)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))])
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over cuDNN (faster layout)")
    env = payload["environment"]
    ax.set_title(f"{env.get('device')}, {dtype}, {direction} (torch {env.get('torch')}, cuDNN {env.get('cudnn')})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


DISPATCH_OPS = {"conv3d_prelu": "conv3d_prelu", "jaccard_loss": "jaccard", "upconv_prelu_add": "upconv_prelu_add"}
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def dispatch_table(payload):
    """{card: {op: {key: backends fastest first}}} in the format of seg3d_fast/backends/dispatch_table.json: op
    "conv3d_prelu" / "jaccard" / "upconv_prelu_add" from the forward rows, "<op>_backward" from the backward rows (the dispatcher may run
    the two directions on different backends). Keys as ops.py builds them; rows sharing a key (shapes that differ in
    volume or residual only) add their times, each backend against the reference on the rows both ran: a backend
    that skipped a row (cannot run it, out of memory, the time limit) is not ranked faster for the time it did not
    spend. The reference backend is timed as the faster eager baseline (the same cuDNN calls)."""
    slots = {}
    for (op, _, dtype, d), by in _rows(payload["records"]).items():
        if d not in ("forward", "backward") or op not in DISPATCH_OPS:
            continue
        shape = next(iter(by.values()))["shape"]
        dt = TORCH_DTYPE_NAMES[dtype]
        key = {"conv3d_prelu": lambda: f"{dt}-k{shape['k']}-s{shape['stride']}-ci{shape['C_in']}-co{shape['C_out']}",
               "upconv_prelu_add": lambda: f"{dt}-ci{shape['C_in']}-co{shape['C_out']}"}.get(
                   op, lambda: f"{dt}-C{shape['C']}")()
        times = {"reference": min((by[b]["ms"] for b in ("eager", "eager_cl") if b in by and by[b]["ms"]),
                                  default=None)}
        times.update({b: by[b]["ms"] for b in ("triton", "cuda") if b in by})
        slot = slots.setdefault((DISPATCH_OPS[op] + ("" if d == "forward" else "_backward"), key), [])
        slot.append({b: ms for b, ms in times.items() if ms is not None})
    table = {}
    for (op, key), rows in slots.items():
        # each backend's total over the rows it shares with the reference, relative to the reference's total there
        # (with every row complete: the order of the plain totals)
        score = {}
        for b in dict.fromkeys(b for row in rows for b in row):
            shared = [row for row in rows if b in row and "reference" in row]
            if shared:
                score[b] = sum(row[b] for row in shared) / sum(row["reference"] for row in shared)
        if len(score) > 1:
            table.setdefault(op, {})[key] = sorted(score, key=score.get)
    return {payload["environment"]["device"]: table}


def write_dispatch_table(payload, path):
    """Merge this card's table into the file at `path` (other cards' entries stay, if measured on the same kernels:
    the file records the kernels' revision, and the dispatcher ignores a file of another revision)."""
    from seg3d_fast.backends import KERNELS_REVISION

    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else {}
    same = old.get("kernels_revision") == KERNELS_REVISION
    cards = dict(old.get("cards", {}) if same else {})
    cards.update(dispatch_table(payload))
    path.write_text(json.dumps({"kernels_revision": KERNELS_REVISION, "cards": cards}, indent=1,
                               sort_keys=True) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--markdown", default=None, help="write the markdown here (default: stdout)")
    parser.add_argument("--png", default=None, help="chart of the (first) benchmarks file")
    parser.add_argument("--summary", action="store_true", help="print the short summary only")
    parser.add_argument("--dispatch-table", default=None, metavar="JSON",
                        help="merge the measured backend order per op and shape into this dispatch table "
                             "(format of seg3d_fast/backends/dispatch_table.json)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--direction", default="both")
    args = parser.parse_args(argv)
    payloads = [load(f) for f in args.files]
    if args.summary:
        print("\n\n".join(summary(p, args.dtype, args.direction) for p in payloads))
    else:
        text = "\n\n".join(markdown(p) for p in payloads) + "\n"
        if args.markdown:
            Path(args.markdown).write_text(text)
        else:
            sys.stdout.write(text)
    bench = next((p for p in payloads if p["kind"] == "benchmarks"), None)
    if args.png and bench is not None:
        chart(bench, args.png, args.dtype, args.direction)
    if args.dispatch_table and bench is not None:
        write_dispatch_table(bench, args.dispatch_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
