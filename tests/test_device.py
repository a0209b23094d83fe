"""Precision: auto picks bf16 on a CPU only where a (cached, per-CPU) probe measures bf16 matmuls faster."""

import pytest
import torch

from lmforge import device as device_module
from lmforge.device import PROBE_FILE, choose_precision
from lmforge.run_folder import read_json

CPU = torch.device("cpu")


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A fake matmul probe that counts its calls, with the probe cache in tmp_path."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    device_module.cpu_matmul_speeds.cache_clear()
    calls = []
    speeds = {"fp32_gflops": 85.0, "bf16_gflops": 1.1}

    def measure():
        calls.append(dict(speeds))
        return dict(speeds)

    monkeypatch.setattr(device_module, "measure_matmul_speeds", measure)
    yield speeds, calls
    device_module.cpu_matmul_speeds.cache_clear()


def test_auto_follows_the_probe_both_ways(probe):
    speeds, _ = probe
    chosen = choose_precision(CPU, "auto")
    assert chosen.dtype is None
    assert str(chosen).startswith("fp32 (auto: bf16 matmul 1.1 GFLOP/s vs fp32 85 on this CPU")

    device_module.cpu_matmul_speeds.cache_clear()
    (probe_cache := device_module.cache_root() / PROBE_FILE).unlink()
    speeds.update(fp32_gflops=193.0, bf16_gflops=402.0)
    chosen = choose_precision(CPU, "auto")
    assert chosen.dtype is torch.bfloat16
    assert str(chosen).startswith("bf16 (auto: bf16 matmul 402 GFLOP/s vs fp32 193")
    # A near tie is noise: fp32 stays.
    device_module.cpu_matmul_speeds.cache_clear()
    probe_cache.unlink()
    speeds.update(fp32_gflops=100.0, bf16_gflops=110.0)
    assert choose_precision(CPU, "auto").dtype is None


def test_the_probe_runs_once_per_cpu_and_is_cached_on_disk(probe, monkeypatch):
    _, calls = probe
    choose_precision(CPU, "auto")
    device_module.cpu_matmul_speeds.cache_clear()  # a new process: only the disk cache is left
    choose_precision(CPU, "auto")
    assert len(calls) == 1
    cached = read_json(device_module.cache_root() / PROBE_FILE)
    assert list(cached) == [device_module.cpu_key()]
    # Another CPU (the same cache folder on a different machine) is probed anew, and both are kept.
    device_module.cpu_matmul_speeds.cache_clear()
    monkeypatch.setattr(device_module, "cpu_key", lambda: "Another CPU | flags 0123456789ab | 2 threads | torch x")
    choose_precision(CPU, "auto")
    assert len(calls) == 2
    assert len(read_json(device_module.cache_root() / PROBE_FILE)) == 2


def test_explicit_choices_and_other_devices_do_not_probe(probe):
    _, calls = probe
    assert choose_precision(CPU, "fp32").dtype is None
    assert choose_precision(CPU, "bf16").dtype is torch.bfloat16
    assert choose_precision(torch.device("meta"), "auto").dtype is None
    assert calls == []


def test_the_key_names_the_cpu_model_and_flags():
    key = device_module.cpu_key()
    assert "flags " in key and f"torch {torch.__version__}" in key


def _real_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    device_module.cpu_matmul_speeds.cache_clear()
    try:
        return choose_precision(CPU, "auto")
    finally:
        device_module.cpu_matmul_speeds.cache_clear()


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX2", reason="runs only on an AVX2-only CPU (bf16 matmuls slow)"
)
def test_the_real_probe_picks_fp32_on_an_avx2_only_cpu(tmp_path, monkeypatch):
    chosen = _real_probe(tmp_path, monkeypatch)
    assert chosen.dtype is None, str(chosen)


@pytest.mark.skipif(
    "amx_bf16" not in device_module.cpu_info().get("flags", "").split(),
    reason="runs only on a CPU with AMX (bf16 matmuls fast)",
)
def test_the_real_probe_picks_bf16_on_a_cpu_with_amx(tmp_path, monkeypatch):
    chosen = _real_probe(tmp_path, monkeypatch)
    assert chosen.dtype is torch.bfloat16, str(chosen)
