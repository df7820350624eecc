"""A bundle cannot make an import costly or print anything raw: an entry
that asks for more generation than the limit is refused before any entry is
regenerated (a 340-byte entry asking for a dense layout at seq_len=2**31-1,
a small one whose layout takes seconds and gigabytes), the limit can be
raised, and keys and text from the bundle are printed escaped and cut.
(A full disk during import exits 1: tests/test_cli_exit_codes.py.)"""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from patternstore import bundle
from patternstore.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, BundleError, read_bundle, write_bundle
from patternstore.cli import main
from patternstore.codec import encode
from patternstore.cost import MAX_GENERATION_BYTES_ENV, generation_cost
from patternstore.fields import INT32_MAX
from patternstore.generate import generate
from patternstore.pattern import Pattern
from patternstore.printable import printable
from patternstore.specs import SparseSpec
from patternstore.store import PatternStore

HUGE_DENSE = SparseSpec("dense", INT32_MAX, 1)
# One branch, 40 times: about 3.5 GB allocated and seconds to generate (2049 candidate blocks
# per row for 4096 rows and 8 heads), estimated over the 4 GiB default limit.
SLOW = SparseSpec("dilated_blocks", 1 << 16, 16, 8, segment_lengths=(4096,) * 40, dilation_rates=(2,) * 40)
SMALL = SparseSpec("local", 1024, 16)


def claimed(spec: SparseSpec) -> bytes:
    """A valid envelope for ``spec`` holding empty arrays: what a doctored bundle can send in a few bytes."""
    empty = torch.zeros(0, dtype=torch.int32)
    return encode(Pattern(spec, {"kv_num_blocks": empty.view(1, 0), "kv_indices": empty}))


@pytest.fixture(autouse=True)
def default_limit(monkeypatch):
    monkeypatch.delenv(MAX_GENERATION_BYTES_ENV, raising=False)


@pytest.fixture
def no_generation(monkeypatch):
    """Fails the test if the bundle reader regenerates anything."""
    def refuse(spec, **_):
        raise AssertionError(f"regenerated {spec.kind} although an entry is over the limit")

    monkeypatch.setattr(bundle, "generate", refuse)


@pytest.mark.parametrize("spec, size", [(HUGE_DENSE, 340), (SLOW, 1000)], ids=["dense 2**31-1", "slow branch"])
def test_a_small_entry_asking_for_a_huge_generation_is_refused_before_any(spec, size, tmp_path, capsys,
                                                                          no_generation):
    path = tmp_path / "doctored.bundle"
    write_bundle(path, [(SMALL.key, encode(generate(SMALL))), (spec.key, claimed(spec))])
    assert len(claimed(spec)) <= size
    code = main(["--dir", str(tmp_path / "store"), "import", str(path)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"entry 1 ({spec.key}) is not regenerated: {spec.kind} spec too large to generate" in err
    assert "the limit is 4.0 GiB" in err and "--trust" in err and "nothing imported" in err
    assert not (tmp_path / "store").exists()  # nothing written, not even the store


def test_the_bound_is_settable_and_covers_what_it_refused(tmp_path, capsys):
    path = tmp_path / "small.bundle"
    write_bundle(path, [(SMALL.key, encode(generate(SMALL)))])
    needed = generation_cost(SMALL).written
    store = tmp_path / "store"
    with pytest.raises(BundleError, match=r"entry 0 \(local-v2-\w+\) is not regenerated"):
        read_bundle(path, max_bytes=needed - 1)
    assert read_bundle(path, max_bytes=needed) == [(SMALL.key, encode(generate(SMALL)))]
    assert main(["--dir", str(store), "--max-generation-bytes", str(needed - 1), "import", str(path)]) == 2
    assert "is not regenerated" in capsys.readouterr().err and not store.exists()
    assert main(["--dir", str(store), "--max-generation-bytes", str(needed), "import", str(path)]) == 0
    assert PatternStore(store, read_only=True).stored_keys() == [SMALL.key]


def test_trust_skips_the_regeneration_and_its_bound(tmp_path, no_generation):
    path = tmp_path / "trusted.bundle"
    write_bundle(path, [(HUGE_DENSE.key, claimed(HUGE_DENSE))])
    assert read_bundle(path, trust=True) == [(HUGE_DENSE.key, claimed(HUGE_DENSE))]


HOSTILE = "\x1b]2;owned\x07\x1b[2J\x9b31m\u202e" + "k" * 200_000  # sets the title, clears the screen, ...


def import_error(tmp_path, capsys, data: dict) -> str:
    path = tmp_path / "hostile.bundle"
    path.write_bytes(msgpack.packb(data, use_bin_type=True))
    assert main(["--dir", str(tmp_path / "store"), "import", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err[:-1].isprintable() and len(err) < 2500  # one short clean line
    return err


def test_keys_and_text_from_a_bundle_are_printed_escaped_and_cut(tmp_path, capsys):
    value = encode(generate(SMALL))
    err = import_error(tmp_path, capsys, {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
                                          "entries": [[HOSTILE, value]]})
    assert "entry 0 (\\x1b]2;owned\\x07\\x1b[2J\\x9b31m\\u202ekkk" in err  # the key, escaped
    assert f"({len(HOSTILE)} characters)" in err and "fails verification: value holds key" in err
    err = import_error(tmp_path, capsys, {"format": BUNDLE_FORMAT, "version": HOSTILE, "entries": []})
    assert "bundle version '\\x1b]2;owned" in err
    assert not (tmp_path / "store").exists()


@given(st.text(), st.integers(1, 60))
def test_printable_text_is_printable_cut_and_unchanged_when_already_safe(text, limit):
    shown = printable(text, limit)
    assert shown.isprintable() and len(shown) <= 10 * limit + len(f"... ({len(text)} characters)")
    if text.isprintable() and len(text) <= limit:
        assert shown == text
    if len(text) > limit:
        assert shown.endswith(f"... ({len(text)} characters)")
