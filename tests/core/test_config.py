"""Config helpers: the --layers range parser (property test against a direct expansion)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crossroute.core.config import parse_layers
from crossroute.core.errors import CrossrouteError


@given(st.lists(st.tuples(st.integers(0, 80), st.integers(0, 8)), min_size=1, max_size=5))
def test_parse_layers_expands_ranges(ranges: list[tuple[int, int]]) -> None:
    spec = ",".join(f"{lo}-{lo + w}" if w else str(lo) for lo, w in ranges)
    want = sorted({i for lo, w in ranges for i in range(lo, lo + w + 1)})
    assert parse_layers(spec) == want


@pytest.mark.parametrize(("spec", "msg"), [("a-3", "'a-3' is not a layer index"), ("5-2", "empty or negative"),
                                           ("", "'' is not a layer index"), ("1,,2", "'' is not")])
def test_parse_layers_errors_name_the_flag(spec: str, msg: str) -> None:
    with pytest.raises(CrossrouteError, match=f"--layers {spec!r}: .*{msg}"):
        parse_layers(spec)
