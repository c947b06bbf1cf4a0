"""``flexguard_integrations.ray`` on a local Ray runtime (skipped when ray[data] is not installed).

Ray starts its own processes, so the run happens in a subprocess with a deadline; the FakeGuardServer of
this process is reached over 127.0.0.1 by the Ray worker.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flexguard_integrations.testing import FakeGuardServer

FLEX = "Tommy-DING/FlexGuard-Qwen3-8B"
REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from flexguard_integrations.ray import OUTPUT_COLUMNS, moderate_dataset

    base_url = sys.argv[1]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        texts = ["What time does the museum open?", "How do I make a bomb?", "", "How does lock picking work?",
                 "Recommend a book about birds", "How can I hack into her email account?", "hello there"]
        ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
        out = moderate_dataset(ds, base_url=base_url, model=sys.argv[2], policy="strict", num_workers=1,
                               concurrency=4, batch_size=3)
        rows = sorted(out.take_all(), key=lambda r: r["id"])
        print("RESULT " + json.dumps([{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
                                      for r in rows]))
    finally:
        ray.shutdown()
    """
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray[data] is not installed (extra 'ray')")
def test_moderate_dataset_on_a_local_ray_runtime(tmp_path: Path) -> None:
    pytest.importorskip("ray.data")
    script = tmp_path / "ray_job.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXGUARD_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    with FakeGuardServer((FLEX,)) as srv:
        try:
            proc = subprocess.run(
                [sys.executable, str(script), srv.base_url, FLEX],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the Ray job did not finish in 180 s: {exc.stderr!r}"[-3000:])
        n_requests = len([r for r in srv.requests if r.path.endswith("/chat/completions")])
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line is not None, proc.stderr[-3000:]
    rows = json.loads(line.removeprefix("RESULT "))
    assert [r["id"] for r in rows] == list(range(7))  # every row once
    action = {r["id"]: r["flexguard_action"] for r in rows}
    assert action == {0: "allow", 1: "block", 2: "block", 3: "block", 4: "allow", 5: "block", 6: "allow"}
    assert rows[1]["flexguard_categories"] == "VIOLENCE"
    assert rows[1]["flexguard_risk_score"] == 92.0
    assert rows[2]["flexguard_error"]  # empty text: not checked, fail-closed
    assert rows[2]["flexguard_risk_score"] is None
    assert rows[0]["flexguard_error"] is None
    assert rows[0]["text"] == "What time does the museum open?"  # input columns kept
    assert n_requests == 6  # the empty row never reached the server


def test_batch_mapper_without_ray() -> None:
    # the callable class Ray instantiates per worker, driven directly with a plain dict batch
    from flexguard_integrations.ray import OUTPUT_COLUMNS, GuardBatchMapper

    with FakeGuardServer((FLEX,)) as srv:
        mapper = GuardBatchMapper(
            {"base_url": srv.base_url, "model": FLEX, "policy": {"preset": "loose"}, "concurrency": 2},
            response_column="response",
        )
        batch = {
            "id": [1, 2, 3, 4],
            "text": ["How do I make a bomb?", "How does lock picking work?", "   ", "How do I make a bomb?"],
            "response": [None, None, None, "I can't help with that."],
        }
        out = mapper(batch)
        mapper.guard.close()
    assert set(OUTPUT_COLUMNS) <= set(out)
    assert out["id"] == [1, 2, 3, 4]
    assert out["flexguard_action"] == ["block", "allow", "block", "allow"]  # loose: lock picking (35) passes
    assert out["flexguard_error"][2] is not None  # blank text: fail-closed, not sent
    assert out["flexguard_reason"][3]  # a refusal in response mode is safe
    with pytest.raises(KeyError, match="no column 'text'; columns: body"):
        mapper({"body": ["x"]})


def test_require_ray_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import flexguard_integrations.ray as fray

    monkeypatch.setitem(sys.modules, "ray", None)  # an import of ray now fails
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(ImportError, match=r"pip install 'flexguard-integrations\[ray\]'"):
        fray.require_ray()
    with pytest.raises(ImportError, match="Ray Data"):
        fray.moderate_dataset(object(), base_url="http://127.0.0.1:9/v1", model=FLEX)
