"""devccl on CUDA tensors across real processes: every collective bit-identical to the same
call on CPU tensors, stream semantics, the torch.distributed backend, DDP bit-identical to
Gloo, FSDP2 against a single-process reference.

These need a GPU: without one every test here skips, printing why (``-ra``); with
DEVCCL_REQUIRE_CUDA=1 they fail instead. Two ranks share one GPU when there is only one."""

from __future__ import annotations

import pytest
from harness import require_cuda, run_ranks

GLOO_EXIT_CRASH = "terminate called without an active exception"


@pytest.fixture(autouse=True)
def _cuda() -> None:
    require_cuda()


def test_cuda_single_process_errors_and_world_of_one() -> None:
    m = run_ranks("cuda_single", 1, timeout=180)[0].report
    assert "cpu but out is on cuda" in m["mixed"] and "one device" in m["mixed"], m
    assert "one device" in m["mixed_gather"], m
    assert ".contiguous()" in m["noncontig"] and "torch.bool" in m["bool"], m


def test_cuda_every_collective_dtype_op_bit_identical_to_cpu() -> None:
    res = run_ranks("cuda_collectives", 2, timeout=600)
    assert all(r.report["checks"] > 300 for r in res)


def test_cuda_stream_semantics() -> None:
    res = run_ranks("cuda_streams", 2, timeout=180)
    for r in res:
        assert r.report["call_s"] < 0.25, r.report  # 0.5 s of GPU work queued ahead: not waited on
    assert res[0].report["late_call_s"] < 0.5, res[0].report  # rank 1 is 1 s late
    assert res[0].report["completed_early"] is False, res[0].report


def test_cuda_torch_backend_every_entry_point_and_stream_semantics() -> None:
    res = run_ranks("torch_cuda", 2, timeout=600)
    for r in res:
        assert r.report["checks"] > 200
        assert "device" in r.report["mixed"] and "device" in r.report["mixed_a2a"], r.report
    r0 = res[0].report
    assert r0["sync_call_s"] < 0.5 and r0["async_wait_s"] < 0.5, r0  # rank 1 is 1 s late
    assert r0["completed_early"] is False, r0


def test_cuda_ddp_bit_identical_to_gloo() -> None:
    dv = run_ranks("ddp_cuda", 2, args=["devccl"], timeout=300)
    for _ in range(3):
        gl = run_ranks("ddp_cuda", 2, args=["gloo"], timeout=300, check=False)
        if all(r.rc == 0 for r in gl) or not any(GLOO_EXIT_CRASH in r.err for r in gl):
            break
    assert all(r.rc == 0 for r in gl), "\n".join(r.describe() for r in gl)
    assert dv[0].report["sha"] == gl[0].report["sha"], "DDP on CUDA over devccl and Gloo ended with different weights"
    assert {"allreduce", "broadcast"} <= set(dv[0].report["calls"]), dv[0].report["calls"]


def test_cuda_fsdp2_matches_single_process() -> None:
    res = run_ranks("fsdp2_cuda", 2, timeout=300)
    for r in res:
        assert r.report["max_diff"] < 1e-5
        assert {"_allgather_base", "_reduce_scatter_base"} <= set(r.report["calls"]), r.report["calls"]
