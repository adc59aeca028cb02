"""bench.select_cost runs (the policy of HEAD as its baseline, one tiny depth) so it cannot rot.
(That the policy forms the padded batches where nothing is shared: test_prefix_plan.py.)"""

from __future__ import annotations

from bench import select_cost
from rm_server import batch_policy


def test_select_cost_runs_against_a_revision(capsys):
    base = select_cost.load_revision("HEAD")
    assert base.BatchPolicy is not batch_policy.BatchPolicy  # its own module, from git
    assert select_cost.main(["--baseline", "HEAD", "--depths", "8", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("ours/baseline") == 3  # one row per kind of queue
