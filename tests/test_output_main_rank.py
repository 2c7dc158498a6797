"""open_on_main_rank is a context manager: rank 0 holds the output's lock for the block and
releases it when the block ends (committed, failed, or refused by ``prepare``); other ranks
get None and create nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from k2mini.errors import UsageError
from k2mini.output import OutputDir, lock_path, open_on_main_rank, partial_dir


def _state(main: bool):
    return SimpleNamespace(is_main_process=main, num_processes=1)


def test_rank0_holds_the_lock_inside_the_block_and_releases_it_after(tmp_path):
    out = tmp_path / "out"
    with open_on_main_rank(out, state=_state(True)) as od:
        assert isinstance(od, OutputDir) and lock_path(out).exists() and partial_dir(out).is_dir()
        with pytest.raises(UsageError, match="another k2mini run is writing it"):
            OutputDir(out).__enter__()
        (od.partial / "x").write_text("done")
        od.commit()
    assert not lock_path(out).exists() and (out / "x").read_text() == "done"


def test_an_error_in_the_block_releases_the_lock_and_keeps_the_partial_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with open_on_main_rank(out, state=_state(True)):
            raise RuntimeError("boom")
    assert not lock_path(out).exists() and not out.exists() and partial_dir(out).is_dir()
    with OutputDir(out, resume=True) as od:  # the next run can take it
        assert od.resumed


def test_a_refusing_prepare_raises_and_releases(tmp_path):
    out = tmp_path / "out"

    def refuse(od):
        raise UsageError("not this one")

    with pytest.raises(UsageError, match="not this one"):
        with open_on_main_rank(out, state=_state(True), prepare=refuse):
            pytest.fail("the block must not run")
    assert not lock_path(out).exists()


def test_other_ranks_get_none_and_create_nothing(tmp_path):
    out = tmp_path / "out"
    with open_on_main_rank(out, state=_state(False)) as od:
        assert od is None
    assert list(tmp_path.iterdir()) == []
