"""Names shared by the torch scenarios and their tests (no torch import)."""

#: What DDP and FSDP call, and the other entry points: every one must be served by devccl.
REQUIRED = {
    "allreduce",
    "allreduce_coalesced",
    "allgather",
    "allgather_coalesced",
    "_allgather_base",
    "allgather_into_tensor_coalesced",
    "_reduce_scatter_base",
    "reduce_scatter",
    "reduce_scatter_tensor_coalesced",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "alltoall_base",
    "alltoall",
    "send",
    "recv",
    "barrier",
}
