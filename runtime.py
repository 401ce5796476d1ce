"""
Where and how a process runs: its device, its place among torchrun's processes, its
numerics and its seed. Shared by the trainers, sample.py, evaluate.py, data.py and
bench.py. (Plumbing: no paper section.)

Launched by torchrun, a process finds RANK, LOCAL_RANK and WORLD_SIZE in its
environment and joins a process group; launched by plain python it is rank 0 of 1 and
nothing here touches torch.distributed.
"""

import os
import random

import numpy as np
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Device and processes


def pick_device(name="auto", mps=True):
    """The torch.device for --device=NAME. "auto" is this process's GPU, else Apple's GPU
    (MPS, where `mps`: the trainers keep to CUDA and CPU), else the CPU. A bare "cuda"
    is this process's GPU too: torchrun starts one process per GPU, numbered LOCAL_RANK.
    A device this machine does not have is refused here, in words (torch's own error
    would only say much later that a device index is invalid)."""
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps and mps_ok else "cpu"
    try:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but torch.cuda.is_available() is False; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    if device.type == "mps" and not mps_ok:
        raise ValueError(f"--device {name} was asked for but torch.backends.mps.is_available() is False; "
                         f"use --device cpu or auto")  # fmt: skip
    return device


def rank_world():
    """(rank, world_size): from the process group once joined, else from torchrun's
    environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed(device="auto", mps=True, backend=None, timeout=None):
    """Pick this process's device and, under torchrun with more than one process, join
    the process group. Returns (rank, world_size, device).

    The backend is NCCL for GPUs and gloo otherwise, which lets the same scripts (and the
    tests) run several processes on CPU. `backend`/`timeout` override torch's defaults."""
    device = pick_device(device, mps)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL, and every bare .cuda(), use the current device
    rank, world = rank_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=timeout)
    return rank, world, device


def barrier():
    """Wait for every process (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown():
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_device():
    """Where a tensor must live to take part in a collective: NCCL moves CUDA tensors
    only, gloo moves CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# -----------------------------------------------------------------------------
# Numerics and seeds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def allow_tf32():
    """Let fp32 matmuls and convolutions use TF32 on Ampere and newer GPUs: ~8x the fp32
    throughput with a 10-bit mantissa, which is plenty for training and running these
    models (the official configs enable it too). No effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def autocast(device, dtype):
    """A mixed-precision context for `dtype` ("fp32" | "bf16" | "fp16"); fp32 turns it off."""
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


def seed_everything(seed):
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Peak FLOP/s, for model FLOPs utilisation (MFU)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s per GPU, from the vendor data
# sheets, matched in this order against torch.cuda.get_device_name(): first hit wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0),
]  # fmt: skip


def peak_flops(device, override_tflops=0.0):
    """Peak FLOP/s of one device for MFU: the override when given, else the table's bf16
    figure for a known GPU, else None (then no MFU is reported: a guess would mislead)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops * 1e12
    return None
