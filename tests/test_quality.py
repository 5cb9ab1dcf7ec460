"""The quality benchmark runner and its command line (small settings: this checks the plumbing)."""

import json

import pytest
import torch

from lelp_fast.cli import main
from lelp_fast.quality import METHODS, QualityConfig, hierarchical, run_quality


def test_every_method_runs_and_reports_metrics():
    cfg = QualityConfig(dataset="hierarchical", seeds=1, teacher_epochs=30, student_epochs=30)
    result = run_quality(cfg, progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"teacher", *METHODS}
    for method in METHODS:
        assert 0.0 <= rows[method]["accuracy_mean"] <= 1.0 and rows[method]["predictive_kl_mean"] >= 0.0
    assert rows["LELP tuned"]["chosen"][0].startswith("S=")


def test_the_subclass_variants_run_on_the_toy_tasks_when_named():
    from lelp_fast.methods.subclass_variants import VARIANTS

    cfg = QualityConfig(dataset="hierarchical", seeds=1, n_teachers=1, teacher_epochs=10, student_epochs=10,
                        subclass_weight=None)
    rows = {r["method"]: r for r in run_quality(cfg, list(VARIANTS), progress=False)["rows"]}
    assert all(0.0 <= rows[m]["accuracy_mean"] <= 1.0 for m in VARIANTS) and not set(VARIANTS) & set(METHODS)


def test_hierarchical_generator_is_deterministic_and_documented_shape():
    x, y, sub = hierarchical(n=500, num_classes=3, subclasses=2, dim=7, seed=4)
    x2, y2, sub2 = hierarchical(n=500, num_classes=3, subclasses=2, dim=7, seed=4)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(sub, sub2)
    assert x.shape == (500, 7) and int(y.max()) == 2 and int(sub.max()) == 1


def test_bench_quality_command_reruns_one_row(tmp_path, capsys):
    out = tmp_path / "row.json"
    assert main(["bench", "quality", "--dataset", "digits-low", "--methods", "vanilla KD", "--seeds", "1",
                 "--quiet", "--out", str(out)]) == 0
    assert "| vanilla KD |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["teacher", "vanilla KD"]
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--methods", "distillation by magic"])


def test_linear_student():
    from lelp_fast.quality.models import MLP

    linear = MLP(7, 0, 3)
    assert [type(m).__name__ for m in linear.modules()] == ["MLP", "Identity", "Linear"]
    assert linear(torch.randn(2, 7)).shape == (2, 3) and torch.equal(linear.embed(torch.ones(1, 7)), torch.ones(1, 7))
