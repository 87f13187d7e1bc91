"""The package in degraded or unusual environments (found by the environment sweep): a home directory that cannot be
found, odd values of the SEG3D_FAST_* variables, broken on-disk caches and dispatch tables. Each either works or
fails with one error naming what is wrong."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seg3d_fast import backends

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, env_changes, tmp_path):
    """Run `code` in a fresh interpreter (module-level settings are read at import) with env_changes applied (None:
    unset); -> CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_import_without_a_home_directory(tmp_path):
    """HOME unset and the user not in the password database (containers run under an arbitrary uid): Path.home()
    raises, and it ran at import, so `import seg3d_fast` failed, even with SEG3D_FAST_CACHE set. Now the cache
    directory is SEG3D_FAST_CACHE where set, else none: measured orders stay in the process."""
    code = """if True:
        import pathlib
        def home(cls):
            raise RuntimeError("Could not determine home directory.")
        pathlib.Path.home = classmethod(home)
        import seg3d_fast
        b = seg3d_fast.backends
        print(b.CACHE_DIR)
        b._measured_cache["card"] = {"conv3d_prelu/k": ["reference"]}
        b._save_measured("card")
        print(b._measured("card"), b.available()["reference"])
    """
    done = run_python(code, {"HOME": None, "SEG3D_FAST_CACHE": None}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["None", "{'conv3d_prelu/k': ['reference']} None"]
    done = run_python(code, {"HOME": None, "SEG3D_FAST_CACHE": str(tmp_path / "cache")}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == str(tmp_path / "cache")
    assert list((tmp_path / "cache").glob("dispatch-card-r*.json"))


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_cache_variable_means_the_default(tmp_path, value):
    """SEG3D_FAST_CACHE="" (a shell's `export SEG3D_FAST_CACHE=`) was Path(""): measured orders went to whatever
    directory the job ran in. Empty or blank now means unset."""
    done = run_python("import seg3d_fast; print(seg3d_fast.backends.CACHE_DIR)",
                      {"SEG3D_FAST_CACHE": value, "HOME": str(tmp_path)}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / ".cache" / "seg3d_fast")


CARD = "NVIDIA H100 80GB HBM3"
KEY = "bfloat16-k3-s1-ci3-co5"


@pytest.fixture
def on_a_gpu(monkeypatch, tmp_path):
    """The dispatcher's GPU path without a GPU: a cuda device of card CARD, no timing, fresh caches in tmp_path;
    -> a function giving the order for conv3d_prelu at KEY."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: CARD)
    monkeypatch.setattr(backends, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(backends, "_measured_cache", {})
    monkeypatch.setattr(backends, "_table_cache", None)
    monkeypatch.setenv(backends.ENV_MEASURE, "0")
    return lambda: backends._preference("conv3d_prelu", torch.device("cuda"), KEY, None, "forward")


@pytest.mark.parametrize("text, problem", [
    ('{"kernels_revision": %d, "cards": {' % backends.KERNELS_REVISION, "cannot be read as JSON"),
    ("", "cannot be read as JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"kernels_revision": %d, "cards": []}' % backends.KERNELS_REVISION, "'cards' is not an object"),
    ('{"kernels_revision": %d, "cards": {"%s": {"conv3d_prelu": {"%s": "cuda"}}}}'
     % (backends.KERNELS_REVISION, CARD, KEY), "expected a list of backend names, got 'cuda'"),
    ('{"kernels_revision": %d, "cards": {"%s": {"conv3d_prelu": {"%s": ["CUDA"]}}}}'
     % (backends.KERNELS_REVISION, CARD, KEY), r"\['CUDA'\] name no backend"),
    (None, "does not exist"),
    ("folder", "Is a directory"),
])
def test_dispatch_table_that_is_not_one(on_a_gpu, monkeypatch, tmp_path, capsys, text, problem):
    """A SEG3D_FAST_DISPATCH_TABLE file that is truncated, empty, of the wrong shape or names no backend is an error
    naming the file and the variable (it was a JSONDecodeError / AttributeError / IsADirectoryError traceback at the
    first GPU op, an order written "cuda" was taken as the backends 'c', 'u', 'd', 'a', and a path naming no file was
    ignored); the command line reports it in one line before any work."""
    path = tmp_path / "table.json"
    if text == "folder":
        path.mkdir()
    elif text is not None:
        path.write_text(text)
    monkeypatch.setattr(backends, "DISPATCH_TABLE", path)
    with pytest.raises(backends.DispatchTableError, match=f"{path}.*SEG3D_FAST_DISPATCH_TABLE.*{problem}"):
        on_a_gpu()
    from seg3d_fast.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seg3d-fast: error: dispatch table") and err.count("\n") == 1 and str(path) in err
    assert not (tmp_path / "demo").exists()


def test_dispatch_table_variable_empty_means_the_committed_table(tmp_path):
    """SEG3D_FAST_DISPATCH_TABLE="" was Path(""), the working directory: IsADirectoryError at the first GPU op."""
    done = run_python("import seg3d_fast as sf; b = sf.backends; print(b.DISPATCH_TABLE == b.COMMITTED_TABLE, "
                      "bool(b._dispatch_table()))", {"SEG3D_FAST_DISPATCH_TABLE": ""}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True True"


@pytest.mark.parametrize("text", ['{"conv3d_prelu/%s": "cuda"}' % KEY, "[]", "null", '{"conv3d_prelu/%s": 5}' % KEY,
                                  '{"conv3d_prelu/%s": ["tritonx"]}' % KEY, "{trunc"])
def test_measured_cache_that_is_not_one_is_measured_again(on_a_gpu, text):
    """A measured-order cache edited by hand or another tool: its entries that are not orders are ignored (measured
    again and replaced). A list or null file raised TypeError / AttributeError at every later run, a string order
    became the backends 'c', 'u', 'd', 'a', an unknown name a ValueError about a backend argument never passed."""
    backends.CACHE_DIR.mkdir()
    backends._cache_file(CARD).write_text(text)
    assert on_a_gpu() == backends.DEFAULT_GPU_ORDER


def test_measured_cache_name_taken_by_a_folder(on_a_gpu, monkeypatch):
    """A folder where the cache file belongs: the order is still measured and used, and no temporary is left."""
    monkeypatch.setenv(backends.ENV_MEASURE, "1")
    monkeypatch.setattr(backends, "_measure", lambda op, bench, device: ["triton", "reference"])
    backends._cache_file(CARD).mkdir(parents=True)
    bench = backends.Bench("conv3d_prelu", (), None)
    assert backends._preference("conv3d_prelu", torch.device("cuda"), KEY, bench, "forward") == ("triton", "reference")
    assert [p.name for p in backends.CACHE_DIR.iterdir()] == [backends._cache_file(CARD).name]


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("On", True),
                                        ("0", False), ("false", False), ("False", False), ("no", False), ("off", False),
                                        ("", None), ("  ", None)])
def test_switches_read_alike(on_a_gpu, monkeypatch, value, on):
    """Each switch was compared with one string: SEG3D_FAST_MEASURE_DISPATCH=true turned the timing off and
    SEG3D_FAST_AUTOTUNE=false left autotuning on, silently. All take 1/0, true/false, yes/no, on/off in any case;
    unset or blank is the default."""
    for name, default in backends.ENV_FLAGS.items():
        monkeypatch.setenv(name, value)
        assert backends.env_flag(name) is (default if on is None else on), name
    monkeypatch.setattr(backends, "_measure", lambda op, bench, device: ["triton", "reference"])
    bench = backends.Bench("conv3d_prelu", (), None)
    measured = backends._preference("conv3d_prelu", torch.device("cuda"), KEY, bench, "forward")
    assert measured == (("triton", "reference") if on in (True, None) else backends.DEFAULT_GPU_ORDER)
    if backends.load("triton") is not None:
        from seg3d_fast.backends.triton import _common

        import triton

        configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (16, 32, 64)]
        monkeypatch.setattr(_common, "interpreting", lambda: False)
        assert len(_common.autotune_configs(configs[1:], configs[0], configs[0])) == (3 if on in (True, None) else 1)


@pytest.mark.parametrize("name, value", [("SEG3D_FAST_MEASURE_DISPATCH", "maybe"), ("SEG3D_FAST_AUTOTUNE", "2"),
                                         ("SEG3D_FAST_TRITON_TMA", "enable"), ("SEG3D_FAST_DETERMINISTIC", "y es"),
                                         ("SEG3D_FAST_CUDA_KERNELS", "V3")])
def test_switch_that_is_not_one_is_one_line_before_any_work(monkeypatch, tmp_path, capsys, name, value):
    """A switch with a value that is neither on nor off (or SEG3D_FAST_CUDA_KERNELS naming no kernels, which raised
    only inside the first cuda op: a traceback) is a one-line error naming the variable before the demo writes
    anything."""
    from seg3d_fast.cli import main

    monkeypatch.setenv(name, value)
    if name != "SEG3D_FAST_CUDA_KERNELS":
        with pytest.raises(ValueError, match=f"environment variable {name}='{value}' is not a switch"):
            backends.env_flag(name)
    elif backends.load("cuda") is None:
        pytest.skip("the cuda backend module cannot be imported here")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seg3d-fast: error: ") and name in err and repr(value) in err and err.count("\n") == 1
    assert not (tmp_path / "demo").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's reason")
@pytest.mark.parametrize("value", ["true", "TRUE", "on"])
def test_triton_interpret_read_as_triton_reads_it(tmp_path, value):
    """Triton's knobs take TRITON_INTERPRET=true (and yes/on): the interpreter ran, while the backend compared with
    "1" only, said 'no CUDA device (set TRITON_INTERPRET=1 ...)' and would have chosen the GPU's tile configs."""
    pytest.importorskip("triton")
    done = run_python("import seg3d_fast as sf; from seg3d_fast.backends.triton import _common; "
                      "print(sf.backends.available()['triton'], _common.interpreting())",
                      {"TRITON_INTERPRET": value}, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None True"


def test_measured_orders_are_measured_again_once_another_backend_can_run(on_a_gpu, monkeypatch):
    """Orders measured before a backend could run here (the CUDA extension built later, Triton installed later)
    leave it out: the orders are kept per set of runnable backends, so the new one is timed (it was never chosen
    until the cache file was deleted)."""
    monkeypatch.setenv(backends.ENV_MEASURE, "1")
    bench = backends.Bench("conv3d_prelu", (), None)
    runnable = {"reference", "triton"}
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: None if name in runnable else "not built")
    monkeypatch.setattr(backends, "_measure", lambda op, bench, device: sorted(runnable, key=backends.DEFAULT_GPU_ORDER.index))
    assert backends._preference("conv3d_prelu", torch.device("cuda"), KEY, bench, "forward") == ("triton", "reference")
    runnable.add("cuda")  # e.g. a later `pip install .` with nvcc present, in a new process
    monkeypatch.setattr(backends, "_measured_cache", {})
    assert backends._preference("conv3d_prelu", torch.device("cuda"), KEY, bench, "forward") == ("cuda", "triton",
                                                                                                  "reference")
    assert len(list(backends.CACHE_DIR.glob("dispatch-*.json"))) == 2
