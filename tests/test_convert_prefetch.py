"""The read-ahead thread returns exactly what a direct read returns, reads each tensor once,
and never reads what is skipped (shards re-used by --resume)."""

from __future__ import annotations

import torch

from k2mini.checkpoint.reader import Checkpoint
from k2mini.convert.prefetch import PrefetchedCheckpoint, Prefetcher


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
