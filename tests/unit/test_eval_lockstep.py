"""Validation split unevenly over two gloo workers (no Ray): rows summed over workers, and workers with
fewer batches run uncounted padding forwards, agreed before the first, so collective forwards (ZeRO-3) stay
in step."""

from __future__ import annotations

import json
import socket

import torch

from engine.evaluation.exported import in_lockstep, sum_across_workers

# rank -> its validation batches (rows per batch): 3 batches / 37 rows on rank 0, none on rank 1
SHARES = {0: [16, 16, 5], 1: []}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        batches = [{"input_ids": torch.full((n, 4), rank + 1)} for n in SHARES[rank]]
        rows = sum(int(b["input_ids"].shape[0]) for b in batches)
        seen: list[int] = []

        def forward(batch: dict[str, torch.Tensor]) -> None:
            seen.append(int(batch["input_ids"][0, 0]))  # which rank's batch was repeated
            dist.all_reduce(torch.ones(1))  # a collective in every forward, as under ZeRO-3

        padded = 0
        for batch, counted in in_lockstep(batches, torch.device("cpu")):
            forward(batch)
            padded += not counted
        total = sum_across_workers(rows, torch.device("cpu"))
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"padded": padded, "total": total, "seen": seen}, f)
    finally:
        dist.destroy_process_group()


def test_uneven_validation_shares_stay_in_lockstep_and_count_every_row(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    result = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert result[0] == {"padded": 0, "total": 37, "seen": [1, 1, 1]}
    # rank 1 had no batch: it borrowed rank 0's first and ran it three times, uncounted
    assert result[1] == {"padded": 3, "total": 37, "seen": [1, 1, 1]}


def test_single_process_needs_no_padding():
    batches = [{"x": torch.zeros(1)}, {"x": torch.ones(1)}]
    assert in_lockstep(batches, torch.device("cpu")) == [(batches[0], True), (batches[1], True)]
    assert sum_across_workers(75, torch.device("cpu")) == 75
