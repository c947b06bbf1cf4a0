"""The resumable writer, the ordered worker pool, the report, and calibration into policy YAML (no server)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from flexguard_integrations.eval.calibrate import (
    Target,
    calibrate,
    load_calibrated,
    split_records,
    write_policies,
)
from flexguard_integrations.eval.data import DataError
from flexguard_integrations.eval.runner import (
    EvalRecord,
    OutputExistsError,
    Progress,
    ResumableWriter,
    build_report,
    format_report,
    load_records,
    run_pool,
    verdict_from_dict,
)
from flexguard_integrations.policy import StrictnessPolicy
from flexguard_integrations.verdict import Category, Surface, Verdict


def key(r: dict[str, object]) -> str:
    return str(r["id"])


# ------------------------------------------------------------------------------------------ writer


def test_writer_refuses_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 1}\n', encoding="utf-8")
    with pytest.raises(OutputExistsError, match="--resume"):
        ResumableWriter(out, key)
    with ResumableWriter(out, key, overwrite=True) as w:
        assert w.done == {}
    assert out.read_text() == ""


def test_writer_resume_drops_a_partial_last_line(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_bytes(b'{"id": 1, "v": "a"}\n{"id": 2, "v": "b"}\n{"id": 3, "v": "c')  # killed mid-line
    with ResumableWriter(out, key, resume=True) as w:
        assert set(w.done) == {"1", "2"}
        assert w.dropped_partial == 1
        w.write({"id": 3, "v": "c"})
    lines = out.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [1, 2, 3]


def test_writer_resume_rejects_foreign_or_duplicated_records(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"nope": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 1 is not a record"):
        ResumableWriter(out, key, resume=True)
    out.write_text('{"id": 1}\n{"id": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="appears twice"):
        ResumableWriter(out, key, resume=True)


def test_writer_retry_errors_removes_failed_rows(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 1, "err": null}\n{"id": 2, "err": "503"}\n{"id": 3, "err": null}\n', encoding="utf-8")
    with ResumableWriter(out, key, resume=True, retry_errors=True, is_error=lambda r: bool(r["err"])) as w:
        assert set(w.done) == {"1", "3"}
        assert w.retried == 1
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1, 3]


# ------------------------------------------------------------------------------------------ pool


def test_pool_writes_in_input_order_with_bounded_window() -> None:
    rng = random.Random(3)
    delays = [rng.random() * 0.01 for _ in range(200)]
    written: list[int] = []
    in_flight = 0
    peak = 0

    async def work(i: int) -> dict[str, object]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(delays[i])
        in_flight -= 1
        return {"id": i}

    n = asyncio.run(run_pool(range(200), work, lambda r: written.append(int(str(r["id"]))), concurrency=8))
    assert n == 200
    assert written == list(range(200))
    assert peak <= 8


def test_pool_propagates_a_failing_work() -> None:
    written: list[object] = []

    async def work(i: int) -> dict[str, object]:
        if i == 5:
            raise RuntimeError("boom")
        return {"id": i}

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(run_pool(range(20), work, written.append, concurrency=2))
    assert len(written) <= 5


def test_progress_line_counts() -> None:
    import io

    buf = io.StringIO()
    p = Progress(10, "eval", stream=buf, interval=0.0)
    p.skipped = 4
    p.update(errors=1)
    p.close()
    assert "5/10" in buf.getvalue()
    assert "1 errors" in buf.getvalue()
    assert "4 resumed" in buf.getvalue()


# ------------------------------------------------------------------------------------------ records and report


def rec(
    i: int,
    score: float,
    *,
    sev: int | None = None,
    label: bool | None = None,
    cats: tuple[Category, ...] = (),
    named: tuple[Category, ...] = (),
    error: str | None = None,
    split: str | None = None,
) -> EvalRecord:
    verdict = Verdict.failed(error) if error else Verdict(risk_score=score, categories=named)
    return EvalRecord(id=f"r{i}", row=i, verdict=verdict, label=label, severity=sev, categories=cats, split=split)


def test_record_round_trip() -> None:
    r = rec(1, 87.0, sev=3, cats=(Category.VIOLENCE,), named=(Category.VIOLENCE,))
    r2 = EvalRecord.from_dict(json.loads(json.dumps(r.to_dict())))
    assert r2 == r
    v = Verdict(risk_score=12.5, categories=(Category.PRIVACY,), native_categories=("PII",), surface=Surface.RESPONSE)
    assert verdict_from_dict(v.to_dict()) == v


def test_report_matches_hand_computation_with_an_error_row() -> None:
    # binary labels; scores as in test_eval_metrics plus one failed verdict labelled safe
    scores = [90.0, 80.0, 80.0, 60.0, 40.0, 40.0, 20.0, 10.0]
    labels = [True, True, False, True, False, True, False, False]
    records = [rec(i, s, label=y) for i, (s, y) in enumerate(zip(scores, labels, strict=True))]
    records.append(rec(99, 0.0, label=False, error="503"))
    report = build_report(records)
    assert (report.n, report.errors, report.label_kind) == (9, 1, "binary")
    moderate = next(s for s in report.strictness if s.name == "moderate")
    # at 41: TP 3, FP 1 + 1 (the error row counts as flagged, fail-closed), FN 1, TN 3
    c = moderate.confusion
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 2, 1, 3)
    assert c.precision == pytest.approx(3 / 5)
    assert c.fpr == pytest.approx(2 / 5)
    # the error row has no score: AUROC / AUPRC are those of the 8 scored rows
    assert moderate.auroc == pytest.approx(0.8125)
    assert moderate.auprc == pytest.approx(37 / 48)
    text = format_report(report)
    assert "guard errors: 1" in text
    assert "moderate" in text


def test_report_severity_positive_class_and_categories() -> None:
    records = [
        rec(0, 3.0, sev=0),
        rec(1, 30.0, sev=1, cats=(Category.ILLEGAL,), named=(Category.ILLEGAL,)),
        rec(2, 50.0, sev=2, cats=(Category.ILLEGAL,), named=(Category.ILLEGAL,)),
        rec(3, 70.0, sev=3, cats=(Category.VIOLENCE,), named=(Category.ILLEGAL,)),
        rec(4, 95.0, sev=4, cats=(Category.VIOLENCE,), named=(Category.VIOLENCE,)),
    ]
    report = build_report(records)
    by = {s.name: s for s in report.strictness}
    # presets 21/41/61 on scores 3/30/50/70/95 vs positives sev>=1/2/3: every strictness is perfect
    for name in ("strict", "moderate", "loose"):
        assert by[name].confusion.f1 == 1.0, name
    assert by["strict"].positive == "severity>=1"
    cats = {c.category: c for c in report.categories}
    # ILLEGAL: labelled on rows 1, 2; named on 1, 2, 3 -> TP 2, FP 1, FN 0
    ill = cats[Category.ILLEGAL].confusion
    assert (ill.tp, ill.fp, ill.fn) == (2, 1, 0)
    # VIOLENCE: labelled on 3, 4; named on 4 -> TP 1, FN 1
    vio = cats[Category.VIOLENCE].confusion
    assert (vio.tp, vio.fp, vio.fn) == (1, 0, 1)
    # share of labelled-ILLEGAL rows flagged: strict 2/2 (30, 50 >= 21), moderate 1/2, loose 0/2
    assert cats[Category.ILLEGAL].flagged == {"strict": 1.0, "moderate": 0.5, "loose": 0.0}


def test_load_records_ignores_a_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps(rec(1, 10.0, label=False).to_dict()) + "\n" + '{"id": "r2", "ro', encoding="utf-8")
    assert [r.id for r in load_records(path)] == ["r1"]


# ------------------------------------------------------------------------------------------ calibration


def calibration_records() -> list[EvalRecord]:
    """Known answer. Uncategorised rows: safe 5..35, unsafe (sev 2) 45..85 -> for moderate (sev >= 2) recall 1.0
    needs the base threshold 45. VIOLENCE-named rows: safe ones up to 60, unsafe ones from 70 -> 70."""
    out: list[EvalRecord] = []
    i = 0
    for s in (5, 10, 15, 20, 25, 30, 35):
        out.append(rec(i, s, sev=0))
        i += 1
    for s in (45, 55, 65, 75, 85):
        out.append(rec(i, s, sev=2))
        i += 1
    v = (Category.VIOLENCE,)
    for s in (40, 50, 60):
        out.append(rec(i, s, sev=1, cats=v, named=v))  # unsafe only under strict
        i += 1
    for s in (70, 80, 90):
        out.append(rec(i, s, sev=3, cats=v, named=v))
        i += 1
    return out


def test_calibrate_known_answer_and_policy_yaml_loads(tmp_path: Path) -> None:
    records = calibration_records()
    (mod,) = calibrate(records, Target("recall", 1.0), strictness=("moderate",), min_support=6)
    # base: the lowest moderate-positive score among all rows is 45 -> threshold 45
    assert mod.base is not None
    assert (mod.base.threshold, mod.base.met) == (45.0, True)
    # chosen on the 12 rows the base governs (VIOLENCE rows have their own threshold)
    assert mod.base_scope == "rows without an own-threshold category (12)"
    # VIOLENCE rows: positives 70, 80, 90, negatives 40, 50, 60 -> 70
    (vio,) = mod.categories
    assert vio.choice is not None
    assert vio.choice.threshold == 70.0
    assert mod.policy.thresholds == {Category.VIOLENCE: 70.0}
    # the combined policy: every moderate positive flagged, no negative flagged
    assert (mod.validation.recall, mod.validation.fpr) == (1.0, 0.0)

    paths = write_policies([mod], tmp_path / "cal", source="fixture")
    assert [p.name for p in paths] == ["moderate.yaml", "calibration.json"]
    loaded = StrictnessPolicy.from_yaml(tmp_path / "cal" / "moderate.yaml")
    assert (loaded.preset, loaded.base_threshold(), loaded.thresholds) == ("moderate", 45.0, {Category.VIOLENCE: 70.0})
    text = (tmp_path / "cal" / "moderate.yaml").read_text()
    assert text.startswith("# Calibrated by `flexguard calibrate` on fixture")
    assert "target recall >= 1" in text
    policies = load_calibrated(tmp_path / "cal")
    assert policies["moderate"].base_threshold() == 45.0
    assert policies["strict"] == StrictnessPolicy.from_preset("strict")  # missing -> preset
    summary = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert summary["results"][0]["base"]["threshold"] == 45.0


def test_calibrate_min_support_and_one_class_categories() -> None:
    records = calibration_records()
    (strict,) = calibrate(records, Target("recall", 1.0), strictness=("strict",), min_support=6)
    # under strict every VIOLENCE row is positive (sev 1 and 3): no threshold can be chosen for it
    (vio,) = strict.categories
    assert vio.choice is None
    assert "are unsafe" in vio.note
    assert strict.base is not None
    assert strict.base.threshold == 40.0  # the lowest strict positive overall
    assert strict.base_scope == "rows without an own-threshold category (18)"  # no category has its own
    (mod,) = calibrate(records, Target("recall", 1.0), strictness=("moderate",), min_support=7)
    assert mod.categories[0].choice is None
    assert "fewer than min_support 7" in mod.categories[0].note


def test_split_records_is_stable_and_honours_a_split_column() -> None:
    records = [rec(i, float(i), label=i % 2 == 0) for i in range(200)]
    val, test = split_records(records, 0.7, seed=1)
    assert len(val) + len(test) == 200
    assert 110 < len(val) < 170
    assert split_records(records, 0.7, seed=1) == (val, test)
    assert split_records(records, 0.7, seed=2) != (val, test)
    tagged = [rec(0, 1.0, label=True, split="valid"), rec(1, 2.0, label=False, split="test")]
    v, t = split_records(tagged, 0.5)
    assert ([r.id for r in v], [r.id for r in t]) == (["r0"], ["r1"])


def test_run_sync_works_inside_a_running_event_loop() -> None:
    from flexguard_integrations.eval.runner import run_sync

    async def five() -> int:
        await asyncio.sleep(0)
        return 5

    async def inside_a_loop() -> int:  # as in Jupyter: a loop already runs in this thread
        return run_sync(five)

    assert run_sync(five) == 5
    assert asyncio.run(inside_a_loop()) == 5
