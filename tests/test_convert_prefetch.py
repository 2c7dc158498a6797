"""The read-ahead threads return exactly what a direct read returns, read each tensor once,
never read what is skipped (shards re-used by --resume), overlap reads where the source
wants that, within the byte budget, and hand a failed read to the consumer."""

from __future__ import annotations

import time

import pytest
import torch

from k2mini.checkpoint.reader import Checkpoint
from k2mini.checkpoint.prefetch import PrefetchedCheckpoint, Prefetcher
from k2mini.errors import CheckpointError
from slow_source import SlowSource


def test_prefetch_in_order_reads_once(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    names = [n for n in ck.tensors if "inv_freq" not in n]
    want = {n: Checkpoint.read_raw(ck, n) for n in names}
    ck2 = Checkpoint.open(tiny_fixture.path)
    start = ck2.source.bytes_read
    pf = Prefetcher(ck2, names, budget=1 << 20)
    pck = PrefetchedCheckpoint(ck2, pf)
    try:
        for n in names:
            got = pck.read_raw(n)
            assert got.dtype == want[n].dtype and torch.equal(got.view(torch.uint8), want[n].view(torch.uint8)), n
    finally:
        pf.close()
    assert ck2.source.bytes_read - start == sum(ck.info(n).nbytes for n in names)


def test_prefetch_skips_unasked_prefix(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    names = [n for n in ck.tensors if "inv_freq" not in n]
    half = len(names) // 2
    start = ck.source.bytes_read
    pf = Prefetcher(ck, names)
    try:
        for n in names[half:]:
            assert torch.equal(PrefetchedCheckpoint(ck, pf).read_raw(n).view(torch.uint8),
                               Checkpoint.open(tiny_fixture.path).read_raw(n).view(torch.uint8))
    finally:
        pf.close()
    assert ck.source.bytes_read - start == sum(ck.info(n).nbytes for n in names[half:])
    # A name outside the order is read directly.
    inv = next(n for n in ck.tensors if "inv_freq" in n)
    assert torch.equal(PrefetchedCheckpoint(ck, pf).read_raw(inv), ck.read_raw(inv))


def test_parallel_read_ahead_overlaps_reads_and_holds_at_most_the_budget(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    names = [n for n in ck.tensors if "inv_freq" not in n]
    want = {n: Checkpoint.read_raw(ck, n) for n in names}
    ck.source = SlowSource(ck.source, concurrency=4)
    start = ck.source.inner.bytes_read
    budget = max(ck.info(n).nbytes for n in names)
    assert ck.total_bytes() > 3 * budget
    pf = Prefetcher(ck, names, budget=budget)
    assert pf.workers == 4
    held = []  # bytes read or being read that the consumer has not taken yet
    consumed = 0
    try:
        for n in names:
            got = PrefetchedCheckpoint(ck, pf).read_raw(n)
            assert torch.equal(got.view(torch.uint8), want[n].view(torch.uint8)), n
            held.append(ck.source.started - consumed)  # read ahead, in flight, and n itself
            consumed += ck.info(n).nbytes
            time.sleep(0.002)  # the consumer's own work, during which reads go on
    finally:
        pf.close()
    # The 4 threads, plus the consumer reading a tensor itself when the budget left no room
    # to read it ahead (the tensor in its hands counts).
    assert 1 < ck.source.max_in_flight <= 4 + 1
    assert 0 < max(held) <= budget
    assert ck.source.inner.bytes_read - start == sum(ck.info(n).nbytes for n in names)  # each tensor read once


def test_a_failed_read_ahead_reaches_the_consumer_and_close_returns(tiny_fixture):
    ck = Checkpoint.open(tiny_fixture.path)
    names = [n for n in ck.tensors if "inv_freq" not in n]
    bad = ck.info(names[len(names) // 2])
    ck.source = SlowSource(ck.source, concurrency=3, fail_at=(bad.file, bad.offset))
    pf = Prefetcher(ck, names)
    try:
        with pytest.raises(CheckpointError, match="connection reset"):
            for n in names:
                PrefetchedCheckpoint(ck, pf).read_raw(n)
    finally:
        pf.close()
    assert all(not th.is_alive() for th in pf.threads)
