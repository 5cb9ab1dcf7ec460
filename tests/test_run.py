"""One config, one command: capture -> fit -> targets -> train -> report (Fashion-MNIST at CI size)."""

import json
import os

import pytest

from lelp_fast.cli import main
from lelp_fast.config import ConfigError, load_config, parse_config
from lelp_fast.examples import fashion_mnist

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = os.path.join(HERE, "..", "examples", "configs", "fashion_mnist_small.yaml")
needs_data = pytest.mark.skipif(not os.path.exists(os.path.join(fashion_mnist.DATA_DIR, "train-images-idx3-ubyte.gz")),
                                reason=f"Fashion-MNIST not installed ({fashion_mnist.INSTALL_HINT})")


@needs_data
def test_fashion_mnist_end_to_end_and_rerun_skips_finished_stages(tmp_path, capsys):
    work = str(tmp_path / "run")
    assert main(["run", SMALL, "--work-dir", work, "--quiet", "--until", "targets"]) == 0
    assert os.path.exists(os.path.join(work, "targets", "manifest.json"))
    assert not os.path.exists(os.path.join(work, "student"))
    assert main(["train", SMALL, "--work-dir", work, "--quiet"]) == 0
    assert os.path.exists(os.path.join(work, "student", "report.json"))
    assert not os.path.exists(os.path.join(work, "report.json"))
    assert main(["run", SMALL, "--work-dir", work, "--quiet"]) == 0
    report = json.load(open(os.path.join(work, "report.json")))
    assert report["teacher_test_accuracy"] > 0.75
    assert report["student_test"]["accuracy"] > 0.75 and report["student_test"]["agreement"] > 0.8
    for path in ("capture/train/manifest.json", "capture/val/manifest.json", "capture/train/head.safetensors",
                 "projector.safetensors", "targets/manifest.json", "student/student.safetensors",
                 "student/report.md", "student/curves.png", "report.md"):
        assert os.path.exists(os.path.join(work, path)), path
    before = {p: open(os.path.join(work, p), "rb").read() for p in ("report.json", "student/student.safetensors")}
    capsys.readouterr()
    assert main(["run", SMALL, "--work-dir", work, "--quiet"]) == 0  # every stage finished: nothing redone
    assert "exists: loaded" in capsys.readouterr().out
    assert before == {p: open(os.path.join(work, p), "rb").read() for p in before}


def test_config_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("work_dir: x\ntask: {factory: 'lelp_fast.examples.fashion_mnist:task'}\ntrain: {epochs: 0}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.epochs: Input should be greater than 0" in err
    with pytest.raises(ConfigError, match="fit.betta: Extra inputs are not permitted"):
        parse_config({"work_dir": "x", "task": {"factory": "a:b"}, "fit": {"betta": 1}})
    with pytest.raises(ConfigError, match="task.factory: String should match pattern"):
        parse_config({"work_dir": "x", "task": {"factory": "no colon"}})
    with pytest.raises(ConfigError, match="config .*missing.yaml: no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    cfg = load_config(SMALL)
    assert cfg.fit.subclasses == 4 and cfg.train.epochs == 4


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.task(str(tmp_path), data_dir=str(tmp_path / "nowhere"))


@needs_data
def test_tune_reports_the_choice_its_kd_arm_and_its_curve(tmp_path):
    work = str(tmp_path / "run")
    assert main(["tune", SMALL, "--work-dir", work, "--subclasses", "2", "4", "--betas", "0.25", "1.0",
                 "--taus", "1.0", "--steps", "20", "--evals", "2", "--seeds", "2"]) == 0
    summary = json.load(open(os.path.join(work, "tune", "tune.json")))
    assert len(summary["results"]) == 5 and [r["subclasses"] for r in summary["results"]].count(1) == 1
    assert summary["best"] == (summary["lelp"] if summary["decision"]["choice"] == "LELP" else summary["kd"])
    assert all(0.5 < r["val_accuracy"] <= 1.0 for r in summary["results"])
    for name in ("tune.png", "tune.md"):
        assert os.path.exists(os.path.join(work, "tune", name))


@needs_data
def test_compact_targets_through_the_config(tmp_path):
    """targets.compact stores u and the teacher logits; the loop applies beta/tau when it reads them."""
    import yaml

    cfg = yaml.safe_load(open(SMALL))
    cfg["work_dir"] = str(tmp_path / "run")
    cfg["targets"] = {"compact": True, "beta": 0.5}
    cfg["train"]["epochs"] = 1
    path = tmp_path / "compact.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--quiet"]) == 0
    manifest = json.load(open(os.path.join(cfg["work_dir"], "targets", "manifest.json")))
    assert manifest["settings"]["compact"] is True
    assert json.load(open(os.path.join(cfg["work_dir"], "report.json")))["student_test"]["accuracy"] > 0.7
