"""Multi-process training: torchrun with 2 CPU processes (gloo) on a tiny real case; both ranks end with identical
weights, which differ from the initial ones, and rank 0 alone writes the run."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

DRIVER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from seg3d_fast.train import TrainConfig, train

    data, out, weights, cache_dir = sys.argv[1:5]
    model = train(TrainConfig(data=data, out=out, epochs=2, samples_per_epoch=4, features=(4, 8), crop=(12, 12, 12),
                              lr=3e-3, progress=False, device="cpu",  # (gloo on CPUs, also on a 1-GPU machine)
                              cache_dir=cache_dir or None))
    torch.save(model.state_dict(), f"{weights}/rank{dist.get_rank()}_of_{dist.get_world_size()}.pt")
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("cache", [False, True])
def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path, cache):
    """With a --cache-dir the ranks preprocess into one folder, each starting from its own part of the case list,
    and read every case back from it."""
    pytest.importorskip("nibabel")  # (here, not at the top: the GPU machine may lack it, and the test below not)
    from data_helpers import brain_csv

    manifest = brain_csv(tmp_path / "data", n_cases=2)
    cache_dir = str(tmp_path / "cache") if cache else ""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "w").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "driver.py"), str(manifest), str(tmp_path / "run"), str(tmp_path / "w"),
                        cache_dir],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    w0 = torch.load(tmp_path / "w" / "rank0_of_2.pt", weights_only=True)
    w1 = torch.load(tmp_path / "w" / "rank1_of_2.pt", weights_only=True)
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    ckpt = torch.load(tmp_path / "run" / "fold_0" / "checkpoint.pt", weights_only=True)
    for k in w0:
        torch.testing.assert_close(ckpt["model"][k], w0[k], rtol=0, atol=0, msg=k)
    # 4 samples per epoch over 2 ranks, batch 1: 2 steps per rank per epoch; weights moved from the seed's init
    torch.manual_seed(0)
    from seg3d_fast.models import Seg3DNet

    init = Seg3DNet(1, 4, (4, 8)).state_dict()
    assert any((init[k] - w0[k]).abs().max() > 1e-4 for k in w0)
    assert len(ckpt["history"]) == 2
    if cache:
        names = sorted(p.name.split(".")[0] for p in (tmp_path / "cache").glob("*.json"))
        assert names == ["case0", "case1"], names  # (each case prepared once, by one of the ranks)


def test_gpu_process_group_also_reduces_cpu_tensors(monkeypatch):
    """On GPUs the process group must take the CPU tensors train() all-reduces (the epoch's loss and Dice sums):
    NCCL alone fails on them ('No backend type associated with device type cpu') at the end of the first epoch."""
    from seg3d_fast import train as train_module

    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: False)
    timeouts = []
    monkeypatch.setattr(train_module.dist, "init_process_group",
                        lambda backend, timeout: (backends.append(backend), timeouts.append(timeout)))
    assert train_module.dist_setup("auto") == (1, 2, torch.device("cuda", 1))
    assert backends == [train_module.GPU_PROCESS_GROUP] == ["cpu:gloo,cuda:nccl"]
    # (rank 0 validates while the others wait at a barrier: longer than NCCL's default 10 minutes)
    assert timeouts == [train_module.PROCESS_GROUP_TIMEOUT] and timeouts[0].total_seconds() >= 3600
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_module.dist_setup("cpu")[2] == torch.device("cpu") and backends[-1] == "gloo"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_gpu_process_group_takes_cpu_and_cuda_tensors(tmp_path):
    """The process group torchrun training makes on GPUs, for real (one process: the GPU machine has one GPU): it
    all-reduces the CPU tensors of the epoch's sums (gloo) and CUDA tensors (NCCL). In a process of its own, so
    that this one's torch.distributed state stays untouched."""
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from seg3d_fast.train import GPU_PROCESS_GROUP
        dist.init_process_group(GPU_PROCESS_GROUP, init_method="file://{tmp_path}/pg", rank=0, world_size=1)
        for t in (torch.arange(3.0), torch.arange(3.0, device="cuda")):
            dist.all_reduce(t)
            assert t.tolist() == [0.0, 1.0, 2.0], t
        dist.destroy_process_group()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
