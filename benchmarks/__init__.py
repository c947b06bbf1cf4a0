"""On-demand benchmarks of flexguard_integrations (not part of the test suite).

Run everything with ``python -m benchmarks.run [--quick] [--json OUT]`` (or ``make bench``); each module also
runs on its own (``python -m benchmarks.overhead`` ...). See ``docs/performance.md`` for the method and results.
"""
