"""dssd_common's shared helpers: the cache re-sync prefix and the background event loop."""
from __future__ import annotations

import pytest

from dssd_common.prefix import common_prefix_len


@pytest.mark.parametrize(("cached", "wanted", "n"), [
    ([], [1, 2], 0),
    ([1, 2, 3], [], 0),
    ([1, 2, 3], [1, 2, 3], 3),
    ([1, 2, 3], [1, 2], 2),
    ([1, 2], [1, 2, 3], 2),
    ([1, 2, 3], [1, 9, 3], 1),
    ([4, 2, 3], [1, 2, 3], 0),
])
def test_common_prefix_len(cached: list[int], wanted: list[int], n: int) -> None:
    assert common_prefix_len(cached, wanted) == n
