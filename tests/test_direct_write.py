"""DirectFile (shards written past the page cache) and RingArena (reused tensor memory):
the bytes on disk and the values handed out must be exactly what a plain write / a fresh
tensor would give."""

from __future__ import annotations

import errno
import os
import random

import pytest
import torch

from k2mini.checkpoint import direct_write, fp8
from k2mini.checkpoint.direct_write import ALIGN, CHUNK, DirectFile
from k2mini.checkpoint.prefetch import RingArena

# Sizes around the alignment and chunk edges, in pieces of uneven length.
SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, CHUNK - 3, CHUNK, CHUNK + 5, 3 * CHUNK + 12345]


def _pieces(n: int, rng: random.Random) -> list[bytes]:
    out, left = [], n
    while left:
        k = min(left, rng.choice([1, 7, 4096, 100_000, CHUNK + 17]))
        out.append(rng.randbytes(k))
        left -= k
    return out


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_file_bytes_equal_a_plain_write(tmp_path, monkeypatch, direct):
    if not direct:
        monkeypatch.setattr(direct_write, "_O_DIRECT", 0)
    rng = random.Random(0)
    for n in SIZES:
        pieces = _pieces(n, rng)
        p = tmp_path / f"f{n}"
        with DirectFile(p) as f:
            for b in pieces:
                f.write(memoryview(b))
            f.finish(fsync=True)
            assert f.size == n
        assert p.read_bytes() == b"".join(pieces), n


def test_o_direct_refused_at_write_falls_back_to_buffered(tmp_path, monkeypatch):
    if not direct_write._O_DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    real = os.pwrite
    calls = []

    def pwrite(fd, buf, off):
        calls.append(off)
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buf, off)

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    data = random.Random(1).randbytes(CHUNK + 999)
    p = tmp_path / "f"
    with DirectFile(p) as f:
        f.write(data)
        f.finish()
        assert not f.direct
    assert p.read_bytes() == data
    assert calls[:2] == [0, 0]  # the refused chunk was written again, buffered


def test_write_error_names_the_file(tmp_path, monkeypatch):
    def pwrite(fd, buf, off):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    p = tmp_path / "shard.safetensors"
    with pytest.raises(OSError) as e, DirectFile(p) as f:
        f.write(b"x" * (2 * CHUNK))
        f.finish()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(p)


def test_arena_never_hands_out_memory_in_use_and_reuses_it():
    arena = RingArena(1 << 20, min_bytes=1)
    rng = random.Random(0)
    live: list[tuple[torch.Tensor, float]] = []
    inside = total = 0
    for step in range(400):
        if live and (rng.random() < 0.5 or len(live) > 6):
            # Mostly oldest first, as convert frees them, sometimes out of order.
            t, v = live.pop(0 if rng.random() < 0.8 else rng.randrange(len(live)))
            assert bool((t == v).all())
            del t
        else:
            n = rng.choice([1, 3, 17]) << rng.randrange(8, 15)
            t = arena.empty((n // 2,), torch.bfloat16)
            total += 1
            base = arena.buf.ctypes.data if arena.buf is not None else 0
            inside += base <= t.data_ptr() < base + arena.capacity
            t.fill_(float(step % 200))
            live.append((t, float(step % 200)))
        for t, v in live:  # nothing handed out later overwrote a tensor still alive
            assert bool((t == v).all()), step
    assert inside > 0.8 * total  # and most tensors did come from the arena
    live.clear()
    del t
    assert not arena.live  # every slot came back once its tensors were gone


def test_arena_keeps_a_slot_while_a_view_of_it_lives():
    arena = RingArena(1 << 20, min_bytes=1)
    t = arena.empty((512, 512), torch.float32)  # the whole arena
    view = t[3].view(torch.uint8).numpy()  # a numpy view of a torch view, as the writer makes
    del t
    base = arena.buf.ctypes.data
    other = arena.empty((16,), torch.float32)
    assert not base <= other.data_ptr() < base + arena.capacity  # still in use: a fresh tensor instead
    del view
    assert arena.empty((512, 512), torch.float32).data_ptr() == base


def test_dequantize_into_out_equals_a_fresh_result():
    w = (torch.randn(300, 200) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2) + 0.1
    out = torch.full((300, 200), 7.0, dtype=torch.bfloat16)
    r = fp8.dequantize(w, s, out=out)
    assert r.data_ptr() == out.data_ptr()
    assert torch.equal(r.view(torch.int16), fp8.dequantize(w, s).view(torch.int16))
    with pytest.raises(ValueError):
        fp8.dequantize(w, s, out=torch.empty(300, 201, dtype=torch.bfloat16))


def test_read_raw_into_out_equals_a_fresh_read(tiny_fixture):
    from k2mini.checkpoint.reader import Checkpoint

    ck = Checkpoint.open(tiny_fixture.path)
    for name in list(ck.tensors)[:20]:
        info = ck.info(name)
        fresh = ck.read_raw(name)
        out = torch.empty_like(fresh)
        assert ck.read_raw(name, out=out).data_ptr() == out.data_ptr()
        assert torch.equal(out.view(torch.uint8), fresh.view(torch.uint8)), info.name
