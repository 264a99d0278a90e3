#!/usr/bin/env python3
"""Train a small model with DistributedDataParallel on synthetic data, over devccl or Gloo.

    torchrun --nproc_per_node=2 examples/ddp_train.py --backend devccl --out /tmp/w_devccl.bin
    torchrun --nproc_per_node=2 examples/ddp_train.py --backend gloo   --out /tmp/w_gloo.bin
    cmp /tmp/w_devccl.bin /tmp/w_gloo.bin      # identical: same bytes, bit for bit

Everything is deterministic: the model and the data come from fixed seeds, every rank trains
on its own shard of each batch, and DDP averages gradients with an all-reduce (sum of the
gradients pre-divided by the world size). With two ranks a sum of two floats does not depend
on the order it is taken in, so the final weights are bit-identical whichever backend moved
the gradients. (With three or more ranks, backends may add in different orders and differ
in the last bits, as Gloo and NCCL do.)

The model has a BatchNorm layer, so DDP also broadcasts buffers every step; small gradient
buckets make the backward pass issue several asynchronous all-reduces per step.

Rank 0 writes the final parameters and buffers (sorted by name, raw little-endian bytes) to
``--out`` and prints their SHA-256; every rank checks that its parameters equal rank 0's.

``--device cuda`` trains on the GPU instead (rank r on GPU LOCAL_RANK % device_count, so
ranks may share one GPU), with deterministic kernels; the two backends still end bit-identical
on two ranks. Without CUDA it says so and trains on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 8),
    )


def synthetic_data(steps: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` global batches of a noisy linear regression task, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, 32, generator=g)
    w = torch.randn(32, 8, generator=g)
    y = x @ w + 0.1 * torch.randn(steps, batch, 8, generator=g)
    return x, y


def weights_bytes(model: nn.Module, buffers: bool = True) -> bytes:
    """The model's parameters (and buffers) as raw bytes, sorted by name."""
    state = model.state_dict() if buffers else dict(model.named_parameters())
    return b"".join(
        state[k].detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() for k in sorted(state)
    )


def pick_device(wanted: str) -> torch.device:
    """The device to train on: the CPU, or this rank's GPU (falling back, with a message,
    when CUDA is not available). Deterministic GPU kernels keep runs bit-reproducible."""
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here; training on the CPU", flush=True)
        return torch.device("cpu")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    return dev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="devccl", help="torch.distributed backend: devccl or gloo (default devccl)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64, help="global batch size (split across ranks)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=None, help="write the final weights here (rank 0)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="train on the CPU (default) or the GPU")
    a = ap.parse_args()
    if a.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS

    if a.backend == "devccl":
        import devccl.torch  # noqa: F401  (registers the backend)

    torch.set_num_threads(1)  # same kernels, same bits, on every run
    dist.init_process_group(a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.batch % world:
        raise SystemExit(f"--batch {a.batch} does not split across {world} ranks")

    dev = pick_device(a.device)
    torch.manual_seed(a.seed)
    if dev.type == "cuda":
        model = nn.parallel.DistributedDataParallel(build_model().to(dev), device_ids=[dev], bucket_cap_mb=0.004)
    else:
        model = nn.parallel.DistributedDataParallel(build_model(), bucket_cap_mb=0.004)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    xs, ys = synthetic_data(a.steps, a.batch, a.seed + 1)
    per = a.batch // world

    for step in range(a.steps):
        x = xs[step, rank * per : (rank + 1) * per].to(dev)
        y = ys[step, rank * per : (rank + 1) * per].to(dev)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == a.steps - 1):
            print(f"step {step:3d} loss {loss.item():.6f}", flush=True)

    # Parameters must agree across ranks; BatchNorm's running statistics are per rank (DDP
    # broadcasts rank 0's before each forward, and the last forward updates them locally).
    mine = torch.frombuffer(bytearray(weights_bytes(model.module, buffers=False)), dtype=torch.uint8).to(dev)
    ref = mine.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([int(torch.equal(mine, ref))], dtype=torch.int32, device=dev)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if not same.item():
        raise SystemExit(f"rank {rank}: weights differ across ranks")
    if rank == 0:
        blob = weights_bytes(model.module)
        digest = hashlib.sha256(blob).hexdigest()
        where = "" if dev.type == "cpu" else f" device {dev}"
        print(f"backend {a.backend} world {world}{where} torch {torch.__version__}: final weights sha256 {digest}")
        if a.out:
            tmp = a.out + ".tmp"
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, a.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
