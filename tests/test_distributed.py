"""Multi-process training (DDP on gloo, 2 CPU processes) against one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from or_core import distributed
from or_core.config import PretrainConfig
from or_core.data import load_split
from or_core.distributed import CPUSyncBatchNorm, convert_cpu_sync_batchnorm
from or_core.train import build_run, pretrain

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Single process: nothing distributed happens
# ----------------------------------------------------------------------------------------------
def test_without_a_process_group_everything_is_a_no_op() -> None:
    assert not distributed.is_distributed() and distributed.is_main_process()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    views = [torch.zeros(6, 3, 4, 4), torch.ones(6, 3, 4, 4)]
    assert all(a is b for a, b in zip(distributed.shard(views), views))
    distributed.check_batch_size(7)
    assert distributed.method_kwargs("simclr", {"temperature": 0.1}) == {"temperature": 0.1}
    loss = torch.tensor(1.5)
    assert distributed.all_reduce_mean(loss) is loss
    method = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert distributed.wrap_method(method, torch.device("cpu")) is method
    assert isinstance(method[1], nn.BatchNorm2d) and not isinstance(method[1], CPUSyncBatchNorm)


def test_cpu_sync_batchnorm_is_plain_batch_norm_in_one_process() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    converted = convert_cpu_sync_batchnorm(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)))
    converted.load_state_dict(ref.state_dict())
    assert isinstance(converted[1], CPUSyncBatchNorm)
    assert converted.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(10, 5)
    torch.testing.assert_close(converted(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(converted[1].running_var, ref[1].running_var, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Two gloo processes: the CPU synchronized batch norm against nn.BatchNorm*d on the full batch
# ----------------------------------------------------------------------------------------------
def _check_sync_bn(rank: int, world: int, shape: tuple[int, ...], bn_cls: type, momentum: float | None) -> None:
    """Forward, gradients, running statistics and eval output of one layer on a sharded batch."""
    torch.manual_seed(0)  # the same full batch and layer on every process
    channels = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    w = torch.randn(shape, dtype=torch.float64)  # loss = sum(out * w): non-trivial gradients
    ref = bn_cls(channels, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    sync = convert_cpu_sync_batchnorm(nn.Sequential(bn_cls(channels, momentum=momentum).double()))[0]
    sync.load_state_dict(ref.state_dict())
    assert isinstance(sync, CPUSyncBatchNorm)

    for _ in range(2):  # two steps: running statistics accumulate
        x.grad = None
        ref.zero_grad()
        sync.zero_grad()
        out_ref = ref(x)
        (out_ref * w).sum().backward()
        n = shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        x_local = x.detach()[part].clone().requires_grad_()
        out = sync(x_local)
        (out * w[part]).sum().backward()  # the sum over processes is the full-batch loss
        grads = torch.cat([sync.weight.grad, sync.bias.grad])
        dist.all_reduce(grads)
        exact = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out, out_ref.detach()[part], **exact)
        torch.testing.assert_close(x_local.grad, x.grad[part], **exact)
        torch.testing.assert_close(grads, torch.cat([ref.weight.grad, ref.bias.grad]), **exact)
        torch.testing.assert_close(sync.running_mean, ref.running_mean, **exact)
        torch.testing.assert_close(sync.running_var, ref.running_var, **exact)
        assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked)
    sync.eval()
    ref.eval()
    torch.testing.assert_close(sync(x.detach()[part]), ref(x.detach())[part], **exact)


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _check_sync_bn(rank, world, (8, 4, 5, 5), nn.BatchNorm2d, 0.1)
        _check_sync_bn(rank, world, (6, 5), nn.BatchNorm1d, None)  # projector heads; cumulative average
        # The data shard, the gather switch and the batch-size check.
        views = [torch.arange(8.0).view(8, 1), torch.arange(8.0, 16.0).view(8, 1)]
        shards = distributed.shard(views)
        assert [s.flatten().tolist() for s in shards] == [
            list(range(4 * rank, 4 * rank + 4)), list(range(8 + 4 * rank, 12 + 4 * rank))
        ]
        assert distributed.method_kwargs("simclr", {})["gather_distributed"] is True
        assert distributed.method_kwargs("simclr", {"gather_distributed": False})["gather_distributed"] is False
        assert "gather_distributed" not in distributed.method_kwargs("byol", {})
        distributed.check_batch_size(64)
        with pytest.raises(ValueError, match="not divisible by the 2 processes"):
            distributed.check_batch_size(63)
        assert distributed.is_main_process() == (rank == 0)
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_matches_batch_norm_on_the_full_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


# ----------------------------------------------------------------------------------------------
# End to end: torchrun with 2 processes vs pretrain in one process
# ----------------------------------------------------------------------------------------------
def _config(data_root: Path, method: str) -> PretrainConfig:
    """4 steps of a narrow ResNet-18 on 256 real CIFAR-10 images, global batch 64."""
    return PretrainConfig(
        method=method, regularizer="so", dataset="cifar10", data_root=str(data_root), width=0.125,
        subset=256, epochs=1, batch_size=64, eval_train_subset=200, eval_test_subset=100,
        linear_epochs=1, knn_k=20, profile="test", method_kwargs={"proj_hidden_dim": 64, "proj_output_dim": 32},
    )


def _assert_same_training(cfg: PretrainConfig, one: Path, two: Path) -> None:
    """The 2-process weights equal the 1-process ones up to floating-point summation order.

    Every floating tensor of the final method state (online and EMA networks, batch-norm running
    statistics) is compared as its change from the initial weights, ``delta``:
    ``|delta_2 - delta_1| <= 0.1 |delta_1| + 1e-6`` (norms per tensor). Not exact: the gradients
    are averaged by an all-reduce, batch-norm sums are added across processes and convolutions
    run on half batches, all in another summation order; the ~1e-7 relative differences of the
    first step are amplified by the next ones to at most ~3% of a tensor's change here (a single
    process with 1 thread vs 2 threads differs as much). A missing synchronization is far outside
    the bound: without synchronized batch norm the median tensor is off by ~80% of its change,
    SimCLR without ``gather_distributed`` by ~17% (and its loss by 12%).
    """
    torch.manual_seed(0)
    with torch.no_grad():
        initial = build_run(cfg).method.state_dict()
    ckpt1 = torch.load(one / "checkpoint.pt", weights_only=False)
    ckpt2 = torch.load(two / "checkpoint.pt", weights_only=False)
    state1, state2 = ckpt1["method"], ckpt2["method"]
    assert state1.keys() == state2.keys()
    off = []
    for key, value in state1.items():
        if not value.is_floating_point():
            assert torch.equal(value, state2[key]), key
            continue
        change = (value - initial[key]).norm().item()
        error = (state2[key] - value).norm().item()
        if error > 0.1 * change + 1e-6:
            off.append(f"{key}: |difference| {error:.3g}, |change| {change:.3g}")
    assert not off, "\n".join(off)
    m1, m2 = ckpt1["history"][-1], ckpt2["history"][-1]
    assert m1["step"] == m2["step"] == 4
    assert m2["ssl_loss"] == pytest.approx(m1["ssl_loss"], rel=2e-3)
    assert m2["or_term"] == pytest.approx(m1["or_term"], rel=1e-4)


@pytest.mark.parametrize("method", ["byol", "simclr"])  # simclr: gather_distributed negatives
def test_two_processes_match_one_process_with_the_same_global_batch(
    method: str, cifar10_dir: Path, tmp_path: Path
) -> None:
    cfg = _config(cifar10_dir.parent, method)
    # Decode the subset first: building the cache draws from the global RNG (decoding workers),
    # which would change the initial weights of whichever run built it.
    load_split(cfg.dataset, "train", cfg.data_root, cfg.image_size, cfg.subset, cfg.seed)
    load_split(cfg.dataset, "test", cfg.data_root, cfg.image_size, 512, cfg.seed)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): fast on a busy CPU
    try:
        pretrain(cfg, tmp_path / "one", progress=False)
        config_file = tmp_path / "config.yaml"
        config_file.write_text(yaml.safe_dump(cfg.to_dict()))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("WORLD_SIZE", None)
        result = subprocess.run(
            [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "or_core", "pretrain", "--config", str(config_file), "--out", str(tmp_path / "two"),
                "--no-progress",
            ],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        _assert_same_training(cfg, tmp_path / "one", tmp_path / "two")
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    assert {p.name for p in two.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"}
    assert yaml.safe_load((two / "config.yaml").read_text()) == cfg.to_dict()
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 1


def test_two_process_run_resumes_bit_identically(cifar10_dir: Path, tmp_path: Path) -> None:
    """torchrun with 2 processes, stopped after epoch 1 and resumed, ends where the same 2-process
    run without a stop ends: every tensor of the final state equal, bit for bit."""
    cfg = _config(cifar10_dir.parent, "byol")
    cfg.epochs, cfg.subset = 2, 128
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)

    def torchrun(out: Path, *extra: str) -> None:
        result = subprocess.run(
            [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "or_core", "pretrain", "--config", str(config_file), "--out", str(out), "--no-progress", *extra,
            ],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    torchrun(tmp_path / "straight")
    torchrun(tmp_path / "resumed", "--stop-after-epochs", "1")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "resumed" / "summary.json").exists()
    torchrun(tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["method"].keys() == b["method"].keys()
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    assert [h["ssl_loss"] for h in a["history"]] == [h["ssl_loss"] for h in b["history"]]
