"""The C drop codes and the Python table must agree, and both must be Cilium's."""

from __future__ import annotations

import re
from pathlib import Path

from cilia.datapath import reasons

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "drop_reasons.h"


def _c_codes() -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"#define\s+(DROP_\w+)\s+(-\d+)", HEADER.read_text())}


def test_every_c_drop_code_has_the_same_python_constant():
    codes = _c_codes()
    assert codes, f"no DROP_ codes parsed from {HEADER}"
    for name, value in codes.items():
        assert getattr(reasons, name) == -value, name
        assert -value in reasons.REASONS, name


def test_cilium_numbers_and_names():
    # Pinned to Cilium's bpf/lib/common.h and pkg/monitor/api/drop.go.
    assert {n: reasons.REASONS[n] for n in (132, 134, 139, 150, 196)} == {
        132: "Invalid source ip",
        134: "Invalid packet",
        139: "Unsupported L3 protocol",
        150: "Unknown L3 target address",
        196: "TTL exceeded",
    }
    assert reasons.reason_name(250) == "Unknown (250)"
    assert reasons.is_drop(132) and not reasons.is_drop(0)
