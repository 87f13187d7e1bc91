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
