"""The GPU benchmark's driver, run in its tiny CPU mode: every placement measured, results written per case."""

from __future__ import annotations

import json

from benchmarks.gpu.run import main, plan_for, run_one


def test_quick_plan_measures_every_placement(tmp_path):
    assert main(["--quick", "--out", str(tmp_path / "res"), "--cache", str(tmp_path / "cache")]) == 0
    data = json.loads((tmp_path / "res" / "gpu_quick.json").read_text())
    rows = {c["spec"]["placement"]: c["result"] for c in data["cases"]}
    assert set(rows) == {"resident", "offload", "stream"}
    for placement, r in rows.items():
        assert r["ok"] and r["placement_used"] == placement, r
        assert r["steps"] == 3 and r["e2e_s"] >= r["time_to_first_step_s"] >= r["teachers_s"] > 0
        assert r["peak_host_rss_gib"] > 0 and r["output_gib"] >= 0
    md = (tmp_path / "res" / "gpu_quick.md").read_text()
    assert md.count("| ok |") == 3 and "python -m benchmarks.gpu --quick" in md


def test_budget_skips_the_remaining_cases_and_still_writes(tmp_path):
    assert main(["--quick", "--budget-s", "0", "--out", str(tmp_path), "--cache", str(tmp_path / "c")]) == 0
    data = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert len(data["cases"]) == 3 and all("budget spent" in c["result"]["skipped"] for c in data["cases"])
    assert (tmp_path / "gpu_quick.md").read_text().count("skipped: budget spent") == 3


def test_a_partial_run_keeps_the_other_cases(tmp_path):
    args = ["--quick", "--budget-s", "0", "--out", str(tmp_path), "--cache", str(tmp_path / "c")]
    assert main(args) == 0
    data = json.loads((tmp_path / "gpu_quick.json").read_text())
    data["cases"][0]["result"] = {"ok": False, "error": "kept from an earlier run"}
    (tmp_path / "gpu_quick.json").write_text(json.dumps(data))
    assert main([*args, "--only", "stream"]) == 0
    cases = json.loads((tmp_path / "gpu_quick.json").read_text())["cases"]
    assert [c["spec"]["placement"] for c in cases] == ["resident", "offload", "stream"]
    assert cases[0]["result"]["error"] == "kept from an earlier run"


def test_a_failing_case_is_recorded_not_raised(tmp_path):
    spec = dict(plan_for(True)[0], placement="nowhere", cache=str(tmp_path))
    result = run_one(spec, timeout=300)
    assert result["ok"] is False and "placement" in result["error"]


def test_full_plan_covers_the_issue_targets():
    cases = plan_for(False)
    first = cases[0]
    assert (first["model"], first["k"], first["inputs"], first["epochs"]) == ("qwen0.5b", 7, 400, 4)
    big = [c for c in cases if c["model"] == "qwen7b-4l"]
    assert {c["placement"] for c in big} == {"offload", "stream"} and all(
        c["memory_cap_gib"] == 79 for c in big
    )
