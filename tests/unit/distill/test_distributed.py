"""Sharding for DDP in one process: the same global batches for any number of ranks, indices, eval shards."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from compressor.errors import CompressorError
from compressor.train.distributed import GlobalBatchSampler, main_first, shard_loader, training_loader


def epochs_of(sampler, epochs=2):
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_together_see_exactly_the_single_process_batches(world):
    single = epochs_of(GlobalBatchSampler(103, 10, shuffle=True, seed=7))
    ranks = [epochs_of(GlobalBatchSampler(103, 10, shuffle=True, seed=7, rank=r, world=world)) for r in range(world)]
    for epoch, batches in enumerate(single):
        assert len(batches) == 11
        # The last batch has 3 samples: 4 ranks cannot all take part, so it is dropped (and only it).
        assert len(ranks[0][epoch]) == (11 if world <= 3 else 10)
        for step, batch in enumerate(batches[: len(ranks[0][epoch])]):
            assert sum((ranks[r][epoch][step] for r in range(world)), []) == batch  # rank r: the r-th slice
    assert single[0] != single[1]  # reshuffled per epoch
    assert len(GlobalBatchSampler(103, 10, shuffle=True, rank=1, world=world)) == len(ranks[1][0])


def test_a_last_batch_smaller_than_the_world_is_dropped_and_shares_are_weighted():
    sampler = GlobalBatchSampler(21, 10, shuffle=False, rank=0, world=2)
    assert len(list(sampler)) == len(sampler) == 2  # 10, 10; the single leftover sample cannot be split
    sampler = GlobalBatchSampler(23, 10, shuffle=False, rank=1, world=2)
    assert list(sampler)[-1] == [22] and sampler.global_size(2) == 3 and sampler.global_size(0) == 10
    with pytest.raises(CompressorError, match="smaller than the 4 processes"):
        GlobalBatchSampler(23, 2, shuffle=False, world=4)


def test_indexed_training_loader_returns_each_samples_dataset_index():
    x = torch.arange(20.0).unsqueeze(1) * 10
    y = torch.arange(20)
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = []
    for inputs, target, index in training_loader(loader, seed=0, indexed=True):
        assert torch.equal(target, index) and torch.equal(inputs[:, 0], index * 10.0)
        seen += index.tolist()
    assert sorted(seen) == list(range(20))
    plain = [batch[1].tolist() for batch in training_loader(loader, seed=0)]
    assert sum(plain, []) == seen  # the same order with or without indices


def test_single_process_helpers_are_the_identity():
    loader = DataLoader(TensorDataset(torch.zeros(5, 1)), batch_size=2)
    assert shard_loader(loader) == (loader, 0)
    batches = [(torch.zeros(2, 1), None)]
    assert shard_loader(batches)[0] is batches  # any iterable of batches works in one process
    assert main_first(lambda: 42) == 42


WORKER = """
import json, sys
from compressor.errors import CompressorError
from compressor.train import distributed as d

assert d.init_from_env()
out = {"rank": d.rank(), "world": d.world_size(), "value": d.main_first(lambda: "made by rank 0" if d.rank() == 0 else "wrong")}
out["mean"] = d.weighted_mean({"acc": float(d.rank())}, count=[1, 3][d.rank()])["acc"]
out["sum"] = d.all_sum([1.0, d.rank()])

def fail():
    raise CompressorError("bad input seen by rank 0")

try:
    d.main_first(fail)
except CompressorError as exc:
    out["error"] = [str(exc), exc.exit_code]
print(json.dumps(out))
"""


def test_two_real_gloo_processes_share_rank_zero_results_and_errors(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    for rank, out in enumerate(results):
        assert out["rank"] == rank and out["world"] == 2
        assert out["value"] == "made by rank 0"
        assert out["mean"] == 0.75  # (0·1 + 1·3) / (1 + 3)
        assert out["sum"] == [2.0, 1.0]
        assert out["error"] == ["bad input seen by rank 0", 2]  # the same one-line error on every rank
