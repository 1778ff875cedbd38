"""Scale-out on torch.distributed (docs/distributed.md): the same trainer under torchrun.

    env.py              torchrun variables, device and backend per rank, rank-0-first helpers
    mesh.py             the (dp, ep) DeviceMesh and its checks against the world
    parallel.py         SingleProcess / Distributed: what the trainer asks of the other ranks
    fsdp.py             FSDP2 per block, summed gradients, global gradient clipping
    expert_parallel.py  experts split over ranks, all_to_all dispatch and combine
    checkpoint.py       DCP checkpoints at any world size, consolidated HF export

Nothing here is imported by the model; the trainer imports `parallel` (and `checkpoint` to
save or resume).
"""
