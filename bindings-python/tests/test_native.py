"""devccl.Communicator across real processes (2 and 3 ranks over loopback)."""

from __future__ import annotations

import pytest
from harness import run_ranks


@pytest.mark.parametrize("n", [2, 3])
def test_every_collective_dtype_op_against_numpy(n: int) -> None:
    res = run_ranks("collectives", n, timeout=150)
    assert all(r.report["checks"] > 1000 for r in res)


@pytest.mark.parametrize("n", [2, 3])
def test_torch_tensors_without_torch_distributed(n: int) -> None:
    run_ranks("torch_tensors", n, timeout=120)


def test_new_dtypes_on_cpu_tensors() -> None:
    """uint32, uint64, float8_e4m3fn, float8_e5m2: every reduction op vs a local reference."""
    res = run_ranks("new_dtypes", 2, timeout=120)
    assert all(r.report["checks"] > 150 for r in res)


def test_async_work_and_gil_release() -> None:
    run_ranks("async_and_gil", 2, timeout=90)


@pytest.mark.parametrize("n", [2, 3])
def test_bad_inputs_raise_clear_errors_on_every_rank(n: int) -> None:
    res = run_ranks("bad_inputs", n, timeout=120)
    for r in res:
        m = r.report
        assert "not C-contiguous" in m["noncontig_numpy"] and "ascontiguousarray" in m["noncontig_numpy"]
        assert "not contiguous" in m["noncontig_torch"] and ".contiguous()" in m["noncontig_torch"]
        assert "format 'h'" in m["int16_numpy"]
        assert "torch.bool" in m["bool_torch"] and "supports" in m["bool_torch"]
        assert "read-only" in m["readonly"]
        assert "buffer protocol" in m["not_a_buffer"]
        assert "all_gather" in m["gather_size"]
        assert "root" in m["root"]
        assert "unknown reduce op" in m["op"]
        assert "overlap" in m["overlap"]
        for k in ("sizes", "dtypes", "colls"):
            assert m[k].split(":")[0] in ("MismatchError", "RemoteError"), (r.rank, k, m[k])
            assert "collective mismatch" in m[k], (r.rank, k, m[k])
        assert "count=" in m["sizes"]
        assert "int32" in m["dtypes"] and "float" in m["dtypes"]
        assert "AbortedError" in m["after_mismatch"]
        assert "destroyed" in m["after_destroy"]


def test_abort_reaches_every_rank_and_poisons() -> None:
    res = run_ranks("abort", 3, timeout=90)
    for r in res[1:]:
        # The collective in flight fails naming the abort: AbortedError, or with 3+ ranks
        # possibly RemoteError when a peer's failure on the abort arrives first.
        assert r.report["first"].split(":")[0] in ("AbortedError", "RemoteError"), r.report
        assert "test abort" in r.report["first"], r.report
        assert r.report["took"] < 10, r.report  # rank 0 aborts after 1 s
    for r in res:
        assert all(a.startswith("AbortedError") for a in r.report["after"]), r.report
        assert "test abort" in r.report["poisoned"]


def test_local_error_on_one_rank_fails_the_others_within_the_timeout() -> None:
    res = run_ranks("one_rank_fails_locally", 2, env={"DEVCCL_TIMEOUT": "3"}, timeout=60)
    assert res[0].report["err"].startswith("InvalidUsageError")
    assert res[1].report["err"].split(":")[0] in ("DevcclTimeoutError", "RemoteError", "AbortedError"), res[1].report
