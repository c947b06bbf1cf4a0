"""benchmarks.instructions reads callgrind_annotate's totals and renders per-check instruction counts."""

from __future__ import annotations

import pytest

instructions = pytest.importorskip("benchmarks.instructions")  # the benchmarks folder is not in the sdist

ANNOTATED = """\
--------------------------------------------------------------------------------
Profile data file 'callgrind.out' (creator: callgrind-3.19.0)
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
2,648,105,219 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                      file:function
--------------------------------------------------------------------------------
2,648,105,219 (100.0%)  ???:_start [/root/.pyenv/versions/3.11.7/bin/python3.11]
   201,000,001 ( 7.59%)  /tmp/build/Modules/gcmodule.c:gc_collect_with_callback [/lib/libpython3.11.so.1.0]
   193,075,867 ( 7.29%)  /tmp/build/Modules/gcmodule.c:gc_collect_main [/lib/libpython3.11.so.1.0]
    12,000,000 ( 0.45%)  /tmp/build/Modules/gcmodule.c:gc_collect_main_helper [/lib/libpython3.11.so.1.0]
"""


def test_parse_annotate_reads_the_total_and_the_collector_line() -> None:
    assert instructions.parse_annotate(ANNOTATED) == (2_648_105_219, 193_075_867)


def test_parse_annotate_without_a_collector_line_counts_zero() -> None:
    text = ANNOTATED.replace("gc_collect_main [", "something_else [")
    assert instructions.parse_annotate(text) == (2_648_105_219, 0)


def test_parse_annotate_without_totals_is_an_error() -> None:
    with pytest.raises(instructions.BenchmarkError, match="PROGRAM TOTALS"):
        instructions.parse_annotate("nothing here\n")


def test_render_gives_per_check_counts_and_the_ratio_between_levels() -> None:
    rows = [
        {
            "kind": "guard_aiohttp",
            "callers": 64,
            "instructions_per_check": 600_000.0,
            "collector_per_check": 10_000.0,
            "rest_per_check": 590_000.0,
        },
        {
            "kind": "guard_aiohttp",
            "callers": 256,
            "instructions_per_check": 660_000.0,
            "collector_per_check": 60_000.0,
            "rest_per_check": 600_000.0,
        },
    ]
    text = instructions.render(rows, [64, 256])
    assert "600k" in text and "660k" in text and "60.0k" in text
    assert "1.100x" in text  # 660k / 600k
    assert "1.017x" in text  # 600k / 590k without the collector
    assert "+50.0k" in text  # the collector's growth per check
