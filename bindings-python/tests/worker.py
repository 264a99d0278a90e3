"""One rank of a multi-process test: ``python worker.py SCENARIO REPORT_PATH [ARGS...]``.

Scenarios live in ``scenarios_native.py`` (devccl.Communicator on numpy arrays and torch
tensors), ``scenarios_torch.py`` (the torch.distributed backend) and ``scenarios_cuda.py``
(both on CUDA tensors; GPU only). A scenario raises to
fail; what it returns (a JSON-able dict) is written to REPORT_PATH for the test to check
across ranks.
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
    tmp = report_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, report_path)
    print(f"rank {rank}: scenario {name} OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
