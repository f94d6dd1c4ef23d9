"""Fuzz of ``one2345 weights verify`` (issue #14, F3): generated garbage, real checkpoints cut short or with flipped
bytes, and well-formed pickles of the wrong structure. Whatever the file holds, verification answers — a result or a
:class:`server.common.errors.One2345Error` — and the command exits 1 or 2 with a message; nothing else may escape.

Bounded: a fixed number of examples per strategy, derandomised, no example database.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.common.errors import One2345Error
from server.service.cli import main
from server.stages.reconstruction.checkpoint import OFFICIAL_NETWORKS, verify_checkpoint

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def small_official() -> bytes:
    buf = io.BytesIO()
    torch.save({**{net: {"w": torch.arange(6.0).reshape(2, 3)} for net in OFFICIAL_NETWORKS}, "iter_step": 5}, buf)
    return buf.getvalue()


REAL = small_official()
PREFIXES = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", REAL[:64], b"{", b"\x93NUMPY"]


def check(path: Path, capsys) -> None:
    try:
        result = verify_checkpoint(path)
    except One2345Error:
        pass
    else:
        assert not result.ok and result.details
    code = main(["weights", "verify", str(path)])
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err and err.strip()


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), tail=st.binary(max_size=2048))
def test_garbage(prefix, tail, tmp_path, capsys):
    path = tmp_path / "garbage.pth"
    path.write_bytes(prefix + tail)
    check(path, capsys)


@FUZZ
@given(cut=st.integers(0, len(REAL) - 1), flips=st.lists(st.tuples(st.integers(0, len(REAL) - 1),
                                                                   st.integers(1, 255)), max_size=8))
def test_damaged_real_checkpoints(cut, flips, tmp_path, capsys):
    data = bytearray(REAL)
    for index, xor in flips:
        data[index] ^= xor
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(data if flips else data[:cut]))  # flipped bytes, or cut short (cut < its length)
    check(path, capsys)


leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                   st.builds(torch.zeros, st.integers(0, 4)))
trees = st.recursive(leaves, lambda children: st.one_of(
    st.lists(children, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.sampled_from(OFFICIAL_NETWORKS)), children,
                    max_size=5)), max_leaves=12)


@FUZZ
@given(tree=trees, networks=st.booleans())
def test_well_formed_pickles_of_the_wrong_structure(tree, networks, tmp_path, capsys):
    payload = {**{net: tree for net in OFFICIAL_NETWORKS}} if networks else tree
    path = tmp_path / "structured.pth"
    torch.save(payload, path)
    check(path, capsys)


def test_the_corpus_includes_a_zip_that_is_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.pkl", b"\x80\x02}q\x00.")
    check(path, capsys)
