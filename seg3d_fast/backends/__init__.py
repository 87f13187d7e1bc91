"""Backends and dispatch.

Each backend (reference, triton, cuda) is a module implementing the contract in API.md. It says why it cannot run
at all here (`unavailable_reason()`) and why it cannot run a given input (`<op>_unsupported(...)`); `select()` picks
the preferred backend that can run an input, or raises `BackendUnsupported` with every reason when an explicit
choice cannot.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

NAMES = ("reference", "triton", "cuda")
ENV_BACKEND = "SEG3D_FAST_BACKEND"
# Preference on a GPU when the dispatch table has no entry for the card/op: compiled kernels first, cuDNN last.
DEFAULT_GPU_ORDER = ("cuda", "triton", "reference")
# Measured backend order per card, op, direction and shape (written by benchmarks/gpu_check.sh via report.py);
# env SEG3D_FAST_DISPATCH_TABLE points at another file.
ENV_DISPATCH_TABLE = "SEG3D_FAST_DISPATCH_TABLE"
COMMITTED_TABLE = Path(__file__).with_name("dispatch_table.json")
DISPATCH_TABLE = Path(os.environ[ENV_DISPATCH_TABLE]) if os.environ.get(ENV_DISPATCH_TABLE, "").strip() else COMMITTED_TABLE

_modules: dict[str, object] = {}
_import_errors: dict[str, str] = {}


class BackendUnsupported(RuntimeError):
    """An explicitly requested backend cannot run the given input; the message lists why."""


class DispatchTableError(ValueError):
    """The dispatch table file cannot be read as one; the message names the file and what is wrong."""


# The on/off switches and their defaults (unset or blank: the default)
ENV_FLAGS = {"SEG3D_FAST_DETERMINISTIC": False, "SEG3D_FAST_MEASURE_DISPATCH": True, "SEG3D_FAST_AUTOTUNE": True,
             "SEG3D_FAST_TRITON_TMA": False}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """The switch env `name` (one of ENV_FLAGS): 1/true/yes/on or 0/false/no/off in any case, unset or blank for its
    default; any other value is a ValueError naming the variable. (Each was compared with one string: "true" turned
    SEG3D_FAST_MEASURE_DISPATCH off, "false" left SEG3D_FAST_AUTOTUNE on, "true" left SEG3D_FAST_TRITON_TMA and
    SEG3D_FAST_DETERMINISTIC off, all silently.)"""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return ENV_FLAGS[name]
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"environment variable {name}={raw!r} is not a switch: expected 1 or 0 (or true/false, yes/no, "
                     f"on/off), or unset it for the default ({int(ENV_FLAGS[name])})")


def deterministic() -> bool:
    """Bitwise-reproducible mode: no float atomics (torch's flag or SEG3D_FAST_DETERMINISTIC=1)."""
    import torch

    return torch.are_deterministic_algorithms_enabled() or env_flag("SEG3D_FAST_DETERMINISTIC")


def device_table(rows, dtype, device):
    """A small constant table as a device tensor without a blocking copy: torch.tensor(..., device=cuda) copies
    from pageable memory and waits for the stream to drain; a pinned source copies asynchronously."""
    import torch

    host = torch.tensor(rows, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def load(name: str):
    """The backend module `name`, or None when it cannot be imported (reason in unavailable_reason)."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES} or None, got {name!r}")
    if name not in _modules and name not in _import_errors:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}")
        except Exception as e:  # noqa: BLE001 - any import failure makes the backend unavailable, with its reason
            _import_errors[name] = f"import failed: {type(e).__name__}: {e}"
    return _modules.get(name)


def unavailable_reason(name: str) -> str | None:
    module = load(name)
    return _import_errors[name] if module is None else module.unavailable_reason()


def available() -> dict[str, str | None]:
    """{backend name: None if it can run here, else the reason it cannot}."""
    return {name: unavailable_reason(name) for name in NAMES}


def unsupported_reasons(name: str, op: str, *args) -> list[str]:
    """Why backend `name` cannot run `op` ("conv3d_prelu" | "jaccard" | "upconv_prelu_add") on these arguments
    ([] = it can)."""
    reason = unavailable_reason(name)
    if reason is not None:
        return [reason]
    return list(getattr(load(name), f"{op}_unsupported")(*args))


def _preference(op: str, device, key: str, bench, direction: str) -> tuple[str, ...]:
    """Backends to try, best first. On the CPU only the reference (Triton's interpreter is for tests, never chosen
    automatically). On a GPU: the committed table of measured winners for this card, op, direction and key (the
    forward and the backward of one op may run on different backends: they share the saved-tensor contract); else
    the forward measured once here (each capable backend timed on the real input) and cached on disk; else the
    default order."""
    if device.type != "cuda":
        return ("reference",)
    import torch

    card = torch.cuda.get_device_name(device)
    table = _dispatch_table().get(card, {})
    order = table.get(op if direction == "forward" else f"{op}_backward", {}).get(key) or table.get(op, {}).get(key)
    if order:
        return tuple(order)
    cache = _measured(card)
    cache_key = f"{op}/{key}"
    if cache_key not in cache and bench is not None and env_flag(ENV_MEASURE):
        cache[cache_key] = _measure(op, bench, device)
        _save_measured(card)
    return tuple(cache.get(cache_key) or DEFAULT_GPU_ORDER)


_table_cache: dict | None = None
_measured_cache: dict[str, dict] = {}
ENV_MEASURE = "SEG3D_FAST_MEASURE_DISPATCH"  # "0": never time backends at run time (use table or default order)


def _cache_dir() -> Path | None:
    """Env SEG3D_FAST_CACHE (unset, empty or blank: ~/.cache/seg3d_fast); None where no home directory can be found
    (HOME unset and the user not in the password database, as in some containers): measured orders are then kept for
    the process only. (Path.home() raised at import, so `import seg3d_fast` failed there even with SEG3D_FAST_CACHE
    set; an empty SEG3D_FAST_CACHE was Path(""), the working directory.)"""
    value = os.environ.get("SEG3D_FAST_CACHE", "")
    if value.strip():
        return Path(value)
    try:
        return Path.home() / ".cache" / "seg3d_fast"
    except RuntimeError:  # "Could not determine home directory"
        return None


CACHE_DIR = _cache_dir()


# Revision of the kernels' speed: bump it with any kernel change that can reorder the backends. A dispatch table or
# an on-disk measurement of another revision is ignored (the order is measured again on first use).
KERNELS_REVISION = 4


def _order_problem(order) -> str | None:
    """Why `order` is not a list of backend names (None: it is one)."""
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        return f"expected a list of backend names, got {order!r}"
    unknown = [name for name in order if name not in NAMES]
    return f"{unknown} name no backend (expected some of {NAMES})" if unknown else None


def _dispatch_table() -> dict:
    """{card: {op: {key: order}}} of the committed table (or SEG3D_FAST_DISPATCH_TABLE's), empty when it was measured
    on other kernels. A file that is not a table is a DispatchTableError naming it (unreadable, truncated or
    hand-edited JSON gave a JSONDecodeError, IsADirectoryError or AttributeError at the first GPU op, and an order
    written as a string was taken letter by letter); a SEG3D_FAST_DISPATCH_TABLE naming no file is one too (it was
    ignored)."""
    global _table_cache
    if _table_cache is None:
        named = DISPATCH_TABLE != COMMITTED_TABLE
        where = f"dispatch table {DISPATCH_TABLE}" + (f" (env {ENV_DISPATCH_TABLE})" if named else "")
        fix = f"fix or remove the file, or unset {ENV_DISPATCH_TABLE}" if named else "restore it from the repository"
        if not DISPATCH_TABLE.exists():
            if named:
                raise DispatchTableError(f"{where} does not exist: unset {ENV_DISPATCH_TABLE} or point it at a table")
            _table_cache = {}
            return _table_cache
        try:
            data = json.loads(DISPATCH_TABLE.read_text())
        except (OSError, ValueError) as e:
            raise DispatchTableError(f"{where} cannot be read as JSON ({type(e).__name__}: {e}): {fix}") from None
        if not isinstance(data, dict):
            raise DispatchTableError(f"{where} is not a JSON object: {fix}")
        if data.get("kernels_revision") != KERNELS_REVISION:
            _table_cache = {}
            return _table_cache
        cards = data.get("cards", {})
        if not isinstance(cards, dict):
            raise DispatchTableError(f"{where}: 'cards' is not an object: {fix}")
        for card, ops in cards.items():
            if not isinstance(ops, dict) or not all(isinstance(keys, dict) for keys in ops.values()):
                raise DispatchTableError(f"{where}: card {card!r} is not an object of ops of keys: {fix}")
            for op, keys in ops.items():
                for key, order in keys.items():
                    problem = _order_problem(order)
                    if problem is not None:
                        raise DispatchTableError(f"{where}: {card} / {op} / {key}: {problem}: {fix}")
        _table_cache = cards
    return _table_cache


def _cache_file(card: str) -> Path | None:
    """The measured orders of this card, kernels revision and set of backends that can run here: orders measured
    before a backend could run (the CUDA extension not yet built, Triton not installed) leave it out, and it was
    never chosen until the file was deleted."""
    if CACHE_DIR is None:
        return None
    name = "".join(c if c.isalnum() else "_" for c in card)
    runnable = "+".join(n for n in NAMES if unavailable_reason(n) is None)
    return CACHE_DIR / f"dispatch-{name}-r{KERNELS_REVISION}-{runnable}.json"


def _measured(card: str) -> dict:
    if card not in _measured_cache:
        path = _cache_file(card)
        try:
            data = json.loads(path.read_text()) if path is not None else {}
        except (OSError, ValueError):
            data = {}
        # entries that are not orders (a file edited by hand or by another tool) are measured again and replaced:
        # a string order was taken letter by letter, and a list or null file raised at every later run
        data = data if isinstance(data, dict) else {}
        _measured_cache[card] = {k: v for k, v in data.items() if _order_problem(v) is None}
    return _measured_cache[card]


def _save_measured(card: str):
    path = _cache_file(card)
    if path is None:
        return
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(_measured_cache[card], indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written cache
    except OSError:
        # a read-only home only costs re-measuring in the next process (nor is the temporary left, where the cache
        # file's name is taken by a folder)
        if tmp.is_file():  # (written, then not renamed)
            tmp.unlink()


def _measure(op: str, bench, device) -> list[str]:
    """Backends that can run this input, fastest first (forward time: median of 3 after a warm-up/tuning call)."""
    import torch

    times = {}
    for name in DEFAULT_GPU_ORDER:
        if unavailable_reason(name) is not None:
            continue
        try:
            module = load(name)
            if not bench.supported(module):
                continue
            bench.run(module)  # warm-up (and Triton autotuning)
            runs = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                bench.run(module)
                end.record()
                end.synchronize()
                runs.append(start.elapsed_time(end))
            times[name] = sorted(runs)[1]
        except Exception:  # noqa: BLE001 - a backend that fails here is simply not chosen
            continue
    return sorted(times, key=times.get)


class Bench:
    """How to time one backend on the input at hand: `supported(module)` and `run(module)`."""

    def __init__(self, op: str, args: tuple, run):
        self.op, self.args, self._run = op, args, run

    def supported(self, module) -> bool:
        return not getattr(module, f"{self.op}_unsupported")(*self.args)

    def run(self, module):
        return self._run(module)


def env_backend() -> str | None:
    """The backend forced by env SEG3D_FAST_BACKEND (unset or empty: None); a value that names no backend is an
    error naming the variable (the user passed no backend argument)."""
    name = os.environ.get(ENV_BACKEND) or None
    if name is not None and name not in NAMES:
        raise ValueError(f"environment variable {ENV_BACKEND}={name!r} names no backend: expected one of {NAMES} "
                         "(or unset it to let the dispatcher choose)")
    return name


def check_environment():
    """Raise the ValueError that the first op would (SEG3D_FAST_BACKEND naming no backend, a switch that is not one,
    SEG3D_FAST_CUDA_KERNELS naming no kernels, a dispatch table that is not one), for the command line to report
    before any work."""
    env_backend()
    for name in ENV_FLAGS:
        env_flag(name)
    cuda = load("cuda")
    if cuda is not None:
        cuda.kernels_version()
    _dispatch_table()


def select(op: str, backend: str | None, device, key: str, args: tuple, bench: Bench | None = None,
           direction: str = "forward", use_env: bool = True) -> str:
    """Name of the backend that runs `op` on `args`. `backend` (or env SEG3D_FAST_BACKEND, where use_env) forces a
    choice."""
    requested = backend or (env_backend() if use_env else None) or None
    if requested is not None:
        reasons = unsupported_reasons(requested, op, *args)
        if reasons:
            raise BackendUnsupported(f"backend {requested!r} cannot run {op} on this input: " + "; ".join(reasons))
        return requested
    tried = {}
    for name in _preference(op, device, key, bench, direction):
        reasons = unsupported_reasons(name, op, *args)
        if not reasons:
            return name
        tried[name] = reasons
    if "reference" not in tried and not unsupported_reasons("reference", op, *args):
        return "reference"
    raise BackendUnsupported(f"no backend can run {op} on this input: {tried}")
