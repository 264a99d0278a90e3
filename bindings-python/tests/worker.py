"""One rank of a multi-process test: ``python worker.py SCENARIO REPORT_PATH [ARGS...]``.

Scenarios live in ``scenarios_native.py`` (devccl.Communicator on numpy arrays and torch
tensors), ``scenarios_torch.py`` (the torch.distributed backend), ``scenarios_parity.py``
(the same calls on Gloo and devccl) and ``scenarios_cuda.py`` (both on CUDA tensors; GPU
only). A scenario raises to fail; what it returns (a JSON-able dict) is written to
REPORT_PATH for the test to check across ranks. A result with ``"_hard_exit": True`` makes
the worker leave with ``os._exit(0)`` right after writing the report (no interpreter
teardown: Gloo can abort there, after the work is done).
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main() -> int:
    name, report_path, *args = sys.argv[1:]
    import scenarios_native

    fn = getattr(scenarios_native, f"scenario_{name}", None)
    if fn is None:  # torch scenarios: import torch only when needed (it takes seconds)
        import scenarios_torch

        fn = getattr(scenarios_torch, f"scenario_{name}", None)
    if fn is None:
        import scenarios_parity

        fn = getattr(scenarios_parity, f"scenario_{name}", None)
    if fn is None:
        import scenarios_cuda

        fn = getattr(scenarios_cuda, f"scenario_{name}", None)
    if fn is None:
        print(f"unknown scenario {name}", file=sys.stderr)
        return 2
    rank = int(os.environ["RANK"])
    try:
        result = fn(*args) or {}
    except BaseException:
        traceback.print_exc()
        print(f"rank {rank}: scenario {name} failed", file=sys.stderr)
        return 1
    hard_exit = bool(result.pop("_hard_exit", False))
    tmp = report_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, report_path)
    print(f"rank {rank}: scenario {name} OK", flush=True)
    if hard_exit:
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
