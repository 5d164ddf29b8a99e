"""Device choice and GPU batch sizing: a no-op on the CPU, memory-driven on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ihf_bids.errors import UsageError
from ihf_bids.harmonize.device import CPU_BATCH_SIZE, batch_size_from_memory, fit_batch_size, resolve_device


def test_auto_is_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(UsageError, match="--gpus all"):
        resolve_device("cuda")


def test_batch_size_from_memory_bounds():
    assert batch_size_from_memory(8e9, 1e8) == 64
    assert batch_size_from_memory(8e9, 1e8, fraction=0.5) == 40
    assert batch_size_from_memory(8e9, 1e8, maximum=16) == 16
    assert batch_size_from_memory(0, 1e8) == 1
    assert batch_size_from_memory(8e9, 0) == 512  # a free item is capped, never a division by zero


def test_cpu_batch_never_probes():
    def probe(_n):
        raise AssertionError("the CPU path must not measure anything")

    assert fit_batch_size("cpu", probe, default=CPU_BATCH_SIZE, maximum=1000) == CPU_BATCH_SIZE


def test_cpu_inference_unchanged_by_automatic_batch():
    """harmonize_volume's default batch on the CPU is the former fixed 8: identical results."""
    from ihf_bids.harmonize import TargetProfile, harmonize_volume
    from ihf_bids.model import FlowConfig, IHFHarmony, LevelConfig

    torch.manual_seed(0)
    model = IHFHarmony(FlowConfig(levels=(LevelConfig(2, 8),), embedding_hidden=16)).eval()
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 100, (16, 20, 11)).astype(np.float32)
    emb = rng.normal(0, 1, (11, 1920)).astype(np.float32)
    target = TargetProfile("a", "T1w", emb, 100.0, 1)
    source = TargetProfile("b", "T1w", emb + 0.1, 90.0, 1)
    auto = harmonize_volume(volume, model, target, source_profile=source)
    fixed = harmonize_volume(volume, model, target, source_profile=source, batch_size=8)
    assert np.array_equal(auto, fixed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_gpu_batch_fits_free_memory():
    calls = []

    def probe(n):
        calls.append(n)
        torch.empty(n * 2**20, dtype=torch.uint8, device="cuda")  # 1 MiB an item

    batch = fit_batch_size("cuda", probe, default=8, maximum=100000)
    assert calls == [2] and batch > 8
