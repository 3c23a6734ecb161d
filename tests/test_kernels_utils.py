"""The host-side launch-size helpers of the kernels, against Triton's own definitions."""

from __future__ import annotations

import triton
from minimind_fast.kernels import utils


def test_cdiv_and_next_power_of_2_agree_with_triton():
    # Ours are plain Python because Triton's are constexpr functions, slow to call from the host.
    for n in [1, 2, 3, 4, 5, 63, 64, 65, 511, 512, 513, 6400, 2**20 - 1, 2**20, 2**31 + 5]:
        assert utils.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 4096):
            assert utils.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert utils.next_power_of_2(0) == 1 and utils.cdiv(0, 7) == 0
