"""Compile the CUDA C++ kernels of seg3d_fast (csrc/) for a GPU architecture without a GPU and report, per kernel:
registers, spills, and for the tensor-core kernels the main loop's machine code: instructions per iteration (one
32-deep K step), tensor-core instructions (HMMA), ldmatrix (LDSM), shared (LDS) and generic (LD) loads, async copies
(LDGSTS). One JSON line per kernel; a summary line last.

Why: a session without a GPU can still check that a kernel change keeps its tensor-core path, loads its operands
with ldmatrix rather than generic loads, does not spill, and how much issue work each K step costs beside its HMMAs
(the first CUDA kernels spent 396 instructions per 16 HMMA on a 64x64 tile, WMMA's generic loads included). The
count is static: the halo kernel's loop also holds the halo copy it runs once per channel chunk (27 K steps).

    python benchmarks/sass_check.py [--arch 90] [--only SUBSTRING]
"""
import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("conv3d_prelu.cu", "jaccard.cu")


def _tool(name):
    """nvcc / cuobjdump from the CUDA toolkit, else the copies Triton ships (cuobjdump)."""
    toolkit = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    found = shutil.which(name) or (str(toolkit) if toolkit.exists() else None)
    if found is None and name == "cuobjdump":
        try:
            import triton
            bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
            found = str(bundled) if bundled.exists() else None
        except ImportError:
            pass
    return found


def compile_cubin(source, arch, out_dir):
    """(cubin path, ptxas -v text) for csrc/<source> at sm_<arch>, with the extension's flags (CMakeLists.txt)."""
    cubin = Path(out_dir) / (Path(source).stem + f"_sm{arch}.cubin")
    cmd = [_tool("nvcc"), "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-arch=sm_{arch}", "-cubin",
           "-Xptxas=-v", "-I", str(ROOT / "csrc"), "-o", str(cubin), str(ROOT / "csrc" / source)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"nvcc failed on {source}:\n{run.stderr[-4000:]}")
    return cubin, run.stderr


def ptxas_usage(text):
    """{mangled kernel: {"registers", "spill_bytes", "stack_bytes"}} from ptxas -v output."""
    usage, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'|Function properties for (\w+)", line)
        if m:
            current = m.group(1) or m.group(2)
            usage.setdefault(current, {"registers": None, "spill_bytes": 0, "stack_bytes": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            usage[current]["stack_bytes"] = int(m.group(1))
            usage[current]["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            usage[current]["registers"] = int(m.group(1))
    return usage


def _instructions(sass_function):
    """[(address, opcode without predicate and modifiers, text)] of one function's disassembly."""
    out = []
    for line in sass_function.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            text = m.group(2)
            opcode = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
            out.append((int(m.group(1), 16), opcode, text))
    return out


def main_loop(instructions):
    """Opcode counts of the innermost loop holding the tensor-core instructions (None if there is none)."""
    mma = [a for a, op, _ in instructions if op in ("HMMA", "HGMMA")]
    if not mma:
        return None
    best = None
    for address, op, text in instructions:
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", text) if op == "BRA" else None
        if target:
            start = int(target.group(1), 16)
            if start < address and any(start <= a <= address for a in mma):
                if best is None or address - start < best[1] - best[0]:
                    best = (start, address)
    if best is None:
        return None
    return collections.Counter(op for a, op, _ in instructions if best[0] <= a <= best[1])


def demangle_short(name):
    """A readable kernel name, e.g. `conv_gemm_v2_kernel<bf16,false,128,64,2,8>`, from the mangled one."""
    for m in re.finditer(r"(?=(\d+))", name):  # Itanium mangling: <length><identifier>, after any hash digits
        size, rest = int(m.group(1)), name[m.start() + len(m.group(1)):]
        if size <= len(rest) and rest[:size].endswith("_kernel"):
            kernel, args = rest[:size], rest[size:]
            break
    else:
        return name
    if not args.startswith("I"):  # not a template
        return kernel
    args = args[1:]
    for mangled, readable in (("13__nv_bfloat16", "bf16,"), ("6__half", "fp16,"), ("f", "fp32,")):
        if args.startswith(mangled):
            args = readable + args[len(mangled):]
            break
    args = re.sub(r"Lb([01])E", lambda m: ("true," if m.group(1) == "1" else "false,"), args)
    args = re.sub(r"Li(\d+)E", r"\1,", args)
    args = re.sub(r"E*(v.*)?$", "", args)
    return f"{kernel}<{args.rstrip(',')}>"


def check(arch, only=None):
    """One record per kernel of every source, compiled for sm_<arch>."""
    cuobjdump = _tool("cuobjdump")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in SOURCES:
            cubin, ptxas_text = compile_cubin(source, arch, tmp)
            usage = ptxas_usage(ptxas_text)
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
            for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
                name = chunk.split("\n", 1)[0].strip()
                short = demangle_short(name)
                if only and only not in short:
                    continue
                loop = main_loop(_instructions(chunk))
                record = {"source": source, "arch": arch, "kernel": short, **usage.get(name, {})}
                if loop is not None:
                    record.update(loop_instructions=sum(loop.values()), hmma=loop["HMMA"], ldsm=loop["LDSM"],
                                  lds=loop["LDS"], generic_loads=loop["LD"], ldgsts=loop["LDGSTS"])
                    record["instructions_per_hmma"] = round(record["loop_instructions"] / max(loop["HMMA"], 1), 2)
                records.append(record)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", help="kernels whose readable name contains this")
    args = parser.parse_args(argv)
    if _tool("nvcc") is None or _tool("cuobjdump") is None:
        sys.exit("sass_check needs nvcc and cuobjdump (CUDA toolkit, or cuobjdump from the triton package)")
    records = check(args.arch, args.only)
    for r in records:
        print(json.dumps(r))
    spills = [r["kernel"] for r in records if r.get("spill_bytes")]
    print(json.dumps({"summary": True, "arch": args.arch, "kernels": len(records), "spilling": spills,
                      "date": datetime.datetime.now().isoformat(timespec="seconds"),
                      "nvcc": subprocess.run([_tool("nvcc"), "--version"], capture_output=True,
                                             text=True).stdout.strip().splitlines()[-1]}))


if __name__ == "__main__":
    main()
