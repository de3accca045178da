"""lmcore.distributed.StopVote between real gloo processes (torch.multiprocessing, no mocks)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lmcore import distributed as D

pytestmark = pytest.mark.unit

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vote(rank: int, port: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        vote = D.StopVote(start=D.Agreed(False, 5.0))
        first = vote(rank == 1, 10.0 + rank)  # rank 1 asks to stop
        second = vote(False, 20.0)
        vote.close()
        out.joinpath(f"rank{rank}.txt").write_text(repr((first, second)))
    finally:
        dist.destroy_process_group()


def test_the_first_vote_answers_the_agreed_start_and_later_votes_the_previous_max(
    tmp_path: Path,
) -> None:
    """Before any vote has come back every rank gets the start it was given (a resumed run's
    elapsed time), not zero: a zero made the step after a resume take the full-run LR."""
    mp.spawn(_vote, args=(_free_port(), tmp_path), nprocs=WORLD, join=True)
    answers = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    expected = repr((D.Agreed(False, 5.0), D.Agreed(True, 11.0)))
    assert answers == [expected] * WORLD


def test_one_process_votes_its_own_values() -> None:
    vote = D.StopVote(start=D.Agreed(False, 5.0))
    assert vote(True, 1.5) == D.Agreed(True, 1.5)
