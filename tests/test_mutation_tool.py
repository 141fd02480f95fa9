"""tools/mutation.py: a rerun with --only keeps the other mutants' results from the last run."""

import importlib.util
import json
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("mutation", Path(__file__).parents[1] / "tools" / "mutation.py")
mutation = importlib.util.module_from_spec(spec)
sys.modules.setdefault("mutation", mutation)  # dataclasses look their module up
spec.loader.exec_module(mutation)


def test_only_rerun_merges_the_last_runs_results(tmp_path, monkeypatch):
    monkeypatch.setattr(mutation, "OUT", tmp_path)
    old = [mutation.Mutant(i, i, i, f"x = {i}", "0 -> 1", status) for i, status in
           enumerate(["killed", "survived", "survived", "no-coverage"])]
    (tmp_path / "m.json").write_text(json.dumps({"results": [vars(m) for m in old]}))
    now = [mutation.Mutant(i, i, i, f"x = {i}", "0 -> 1", "skipped") for i in range(4)]
    now[2].status = "killed"  # rerun with --only 2
    now[3] = mutation.Mutant(3, 3, 3, "y = 3", "0 -> 1", "skipped")  # the code changed here: no result to keep
    mutation.merge_last_run("m", now, equivalents={"x = 1 | 0 -> 1": "why"})
    assert [m.status for m in now] == ["killed", "equivalent", "killed", "skipped"]
    report = mutation.summarise("m", now, {"x = 1 | 0 -> 1": "why"})
    assert (report["mutants"], report["killed"], report["equivalent"], report["score"]) == (3, 2, 1, 1.0)
