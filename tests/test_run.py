"""One config, one command: capture -> fit -> targets -> train -> report (Fashion-MNIST at CI size)."""

import json
import os
import shutil

import pytest
import torch

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
    assert capsys.readouterr().out.count("skipped (unchanged)") == 6
    assert before == {p: open(os.path.join(work, p), "rb").read() for p in before}


@needs_data
def test_fashion_mnist_task_trains_its_teacher_again_for_other_settings(tmp_path):
    """The task caches its teacher in the work_dir. Until session 58 it loaded that file whatever
    n_train, teacher_epochs or seed had made it, so an edit of those kwargs redid the capture with the
    old teacher."""
    def teacher(**kwargs):
        made = fashion_mnist.task(str(tmp_path), n_val=50, n_test=50, **{"n_train": 300, "teacher_epochs": 1, **kwargs})
        return {k: v.clone() for k, v in made.teacher.state_dict().items()}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    first = teacher()
    assert same(teacher(), first)  # the cached one
    for edit in ({"teacher_epochs": 2}, {"seed": 1}, {"n_train": 200}):
        assert not same(teacher(**edit), first), edit
        assert same(teacher(**edit), teacher(**edit)), edit  # cached again under the new settings
    # relabelled data in the same data_dir: trained again (until session 66 keyed on the directory's
    # path, so the teacher of the old labels stayed, 13 % agreement with the new ones in an audit)
    import gzip
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fashion_mnist.DATA_DIR, data)
    again = teacher(data_dir=str(data))
    assert same(again, first)  # the same rows from another directory: the cached one
    labels = data / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8:8 + 300] = bytes(9 - b for b in raw[8:8 + 300])
    labels.write_bytes(gzip.compress(bytes(raw)))
    assert not same(teacher(data_dir=str(data)), first)


@needs_data
def test_a_damaged_cached_teacher_is_trained_again_and_the_cache_is_byte_stable(tmp_path):
    """The example task loaded its cached teacher.safetensors without a checksum: a flipped bit became
    the teacher of every stage (a session-65 audit). Its four metadata keys were written in hash
    order, so the same teacher gave other bytes."""
    def teacher(work_dir):
        made = fashion_mnist.task(str(work_dir), n_train=300, n_val=50, n_test=50, teacher_epochs=1)
        return {k: v.clone() for k, v in made.teacher.state_dict().items()}

    first = teacher(tmp_path / "a")
    teacher(tmp_path / "b")
    cached = tmp_path / "a" / "teacher.safetensors"
    assert cached.read_bytes() == (tmp_path / "b" / "teacher.safetensors").read_bytes()
    raw = bytearray(cached.read_bytes())
    raw[-5] ^= 0x10
    cached.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="teacher.safetensors fails its sha256 checksum"):
        again = teacher(tmp_path / "a")
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert cached.read_bytes() == (tmp_path / "b" / "teacher.safetensors").read_bytes()


@needs_data
def test_a_bad_student_kind_is_named_before_any_stage_runs(tmp_path, capsys):
    """Until session 58 the task's student kind was first read by the train stage, after the capture,
    fit and targets had run (minutes at full size)."""
    work = tmp_path / "run"
    assert main(["run", SMALL, "--work-dir", str(work), "--quiet", "--set", "task.kwargs.student=cnn"]) == 2
    assert "task.kwargs.student must be 'linear' or 'mlp', got 'cnn'" in capsys.readouterr().err
    assert not (work / "capture").exists()


def test_config_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("work_dir: x\ntask: {factory: 'lelp_fast.examples.fashion_mnist:task'}\ntrain: {epochs: 0}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.epochs: value must be an integer >= 1, got 0" in err
    with pytest.raises(ConfigError, match="fit.betta: unknown key"):  # pydantic's "Extra inputs are not permitted"
        parse_config({"work_dir": "x", "task": {"factory": "a:b"}, "fit": {"betta": 1}})
    # a value from --set is named as such, and the file as "config PATH" (until session 58: the path alone)
    with pytest.raises(ConfigError, match=r"^config .*fashion_mnist_small.yaml: train.epochs \(--set\): value must be"):
        load_config(SMALL, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="task.factory: String should match pattern"):
        parse_config({"work_dir": "x", "task": {"factory": "no colon"}})
    with pytest.raises(ConfigError, match="config .*missing.yaml: no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    cfg = load_config(SMALL)
    assert cfg.fit.subclasses == 4 and cfg.train.epochs == 4


def test_a_config_reads_exponents_without_a_dot_and_refuses_parquet_bf16_when_read(tmp_path):
    """A session-66 audit: `lr: 1e-3` was refused ("got '1e-3'": YAML 1.1 reads an exponent without a
    dot as a string) where `1.0e-3` was taken; targets.format parquet with dtype bfloat16 passed the
    config, and the targets stage removed the stored targets before failing; `--set nosuch.key=1`
    was not named as a --set key."""
    path = tmp_path / "run.yaml"
    path.write_text("work_dir: x\ntask: {factory: 'a:b'}\ntrain: {lr: 1e-3, weight_decay: 5E-4}\n"
                    "fit: {iteration_sample: 1.25e-1}\n")
    cfg = load_config(str(path), ["train.tau=2e0"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.fit.iteration_sample, cfg.train.tau) == (1e-3, 5e-4, 0.125, 2.0)
    path.write_text("work_dir: x\ntask: {factory: 'a:b', kwargs: {name: 1e3x}}\n")
    assert load_config(str(path)).task.kwargs["name"] == "1e3x"
    with pytest.raises(ConfigError, match=r"targets.format parquet stores float32 or float16, not targets.dtype bfloat16"):
        load_config(str(path), ["targets.format=parquet", "targets.dtype=bfloat16"])
    load_config(str(path), ["targets.format=parquet", "targets.dtype=float16"])
    with pytest.raises(ConfigError, match=r"nosuch \(--set\): unknown key"):
        load_config(str(path), ["nosuch.key=1"])
    # a section's own check is not blamed on a --set key inside the section (a review)
    path.write_text("work_dir: x\ntask: {factory: 'a:b'}\ntargets: {format: parquet, dtype: bfloat16}\n")
    with pytest.raises(ConfigError, match=r": targets: targets.format parquet") as info:
        load_config(str(path), ["targets.chunk_mb=32"])
    assert "(--set)" not in str(info.value)


@pytest.mark.parametrize("section", ["capture", "fit", "targets", "train"])
def test_a_bad_device_is_refused_when_the_config_is_read(section):
    """A device string torch cannot read failed only at the stage that used it (after the stages
    before it ran, a changed capture.device having removed the old capture), without naming the key."""
    with pytest.raises(ConfigError, match=rf"{section}.device: value must be a torch device .* got 'gpu7'"):
        parse_config({"work_dir": "x", "task": {"factory": "a:b"}, section: {"device": "gpu7"}})
    assert getattr(parse_config({"work_dir": "x", "task": {"factory": "a:b"}, section: {"device": "cuda:1"}}),
                   section).device == "cuda:1"


def test_jsd_is_accepted_as_the_divergence_of_a_config():
    from lelp_fast.train import TrainSettings

    cfg = parse_config({"work_dir": "x", "task": {"factory": "a:b"}, "train": {"divergence": "jsd", "jsd_beta": 0.1}})
    TrainSettings(**cfg.train.model_dump()).check()  # what run() builds from it
    with pytest.raises(ConfigError, match="train.divergence: Input should be"):
        parse_config({"work_dir": "x", "task": {"factory": "a:b"}, "train": {"divergence": "jensen"}})
    with pytest.raises(ValueError, match="train.divergence must be one of"):
        TrainSettings(divergence="jensen").check()


@pytest.mark.parametrize("kwargs, key", [({"n_test": 0}, "n_test"), ({"n_train": 0}, "n_train"),
                                         ({"n_train": -5}, "n_train"), ({"n_val": 0}, "n_val")])
def test_the_example_task_names_a_bad_split_size_before_anything_runs(tmp_path, kwargs, key):
    """n_test = 0 ran every stage and failed in the report (torch.cat of no tensors); n_train = -5
    trained the teacher on 59,995 rows; n_train = 0 or n_val = 0 failed in a loader, naming no key."""
    with pytest.raises(ValueError, match=rf"task.kwargs.{key} must be an integer >= 1"):
        fashion_mnist.task(str(tmp_path), data_dir=str(tmp_path / "nowhere"), **kwargs)


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


# ---- issue 20: a rerun redoes exactly what changed, and says so ---------------------------------

def _tiny_config(tmp_path, **sections):
    raw = {"work_dir": str(tmp_path / "run"), "task": {"factory": "tiny_task:task", "kwargs": {}},
           "capture": {"dtype": "float32", "batch_size": 100}, "fit": {"subclasses": 2},
           "train": {"epochs": 2, "batch_size": 50, "lr": 0.01, "tensorboard": False}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_config(raw)


def _run_logged(cfg, **kw):
    from lelp_fast.run import run

    lines, said = [], {}
    report = run(cfg, log=lines.append, **kw)
    for line in lines:  # each stage's first line is its status (training then logs its epochs)
        said.setdefault(line.split("]")[0][1:], line.split("] ", 1)[1])
    assert said.pop("task").startswith("tiny_task:task: building")
    return report, said


def _bytes(tmp_path, *names):
    return {n: (tmp_path / "run" / n).read_bytes() for n in names}


def test_a_rerun_after_a_config_edit_redoes_exactly_the_changed_stages(tmp_path):
    outputs = ("projector.safetensors", "targets/manifest.json", "student/student.safetensors", "report.md")
    _, said = _run_logged(_tiny_config(tmp_path))
    assert set(said.values()) == {"started"}
    first = _bytes(tmp_path, *outputs)
    _, said = _run_logged(_tiny_config(tmp_path))
    assert set(said.values()) == {"skipped (unchanged)"}
    assert _bytes(tmp_path, *outputs) == first

    _, said = _run_logged(_tiny_config(tmp_path, fit={"beta": 0.05}))
    assert said["capture"] == "skipped (unchanged)"
    assert said["fit"] == "redone: fit.beta 0.25 -> 0.05"
    assert said["targets"] == "redone: input fit changed" and said["train"].startswith("redone: input targets")
    now = _bytes(tmp_path, *outputs)
    assert all(now[n] != first[n] for n in outputs)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["fit"]["beta"] == 0.05 and "beta=0.05" in now["report.md"].decode()

    _, said = _run_logged(_tiny_config(tmp_path, fit={"beta": 0.05}, train={"lr": 0.003}))
    assert [said[s] for s in ("capture", "fit", "targets")] == ["skipped (unchanged)"] * 3
    assert said["train"] == "redone: train.lr 0.01 -> 0.003"
    _, said = _run_logged(_tiny_config(tmp_path, fit={"beta": 0.05}, train={"lr": 0.003}, task={"kwargs": {"student": "mlp"}}))
    assert said["capture"] == "redone: task.kwargs.student <unset> -> mlp" and said["train"].startswith("redone")


def test_data_edited_under_the_same_config_is_captured_or_reported_again(tmp_path, monkeypatch):
    """The run fingerprinted the task's kwargs, not its rows: data edited in place kept every stage
    (a session-66 audit, which also found `--redo capture` kept the example's cached teacher)."""
    import tiny_task

    _run_logged(_tiny_config(tmp_path))
    monkeypatch.setattr(tiny_task, "EDITED", {"test"})
    _, said = _run_logged(_tiny_config(tmp_path))
    assert [said[s] for s in ("capture", "fit", "targets", "train", "baseline")] == ["skipped (unchanged)"] * 5
    assert said["report"] == "redone: input test changed"
    monkeypatch.setattr(tiny_task, "EDITED", {"test", "val"})
    _, said = _run_logged(_tiny_config(tmp_path))
    assert said["capture"] == "redone: input data changed" and said["report"].startswith("redone")


def test_removing_a_training_directorys_checkpoint_or_logs_costs_no_retraining(tmp_path):
    """Every file under student/ was recorded as output: removing its resume checkpoint, curves or
    report.md (to free space) retrained the student from scratch (a session-66 audit)."""
    cfg = _tiny_config(tmp_path, train={"tensorboard": True})
    _run_logged(cfg)
    run_dir = tmp_path / "run"
    import shutil

    for name in ("student/checkpoint.pt", "student/curves.png", "student/report.md", "baseline/student/report.md",
                 "baseline/student/checkpoint.pt"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "student" / "tensorboard")
    _, said = _run_logged(cfg)
    assert set(said.values()) == {"skipped (unchanged)"}, said
    (run_dir / "student" / "report.json").unlink()
    _, said = _run_logged(cfg)
    assert said["train"] == f"redone: {run_dir / 'student' / 'report.json'} is missing"


def test_a_killed_runs_temp_files_are_removed_and_a_second_tune_is_refused(tmp_path):
    """kill -9 mid-write left .tmp-rank0-* files (a checkpoint's as large as the model and optimiser)
    in student/, baseline/student/, .stages/ and work_dir for good; two tunes of one work_dir ran at
    once (a session-66 audit)."""
    from lelp_fast.io.locks import ExclusiveLock, LockHeldError
    from lelp_fast.tune import TuneGrid, tune

    cfg = _tiny_config(tmp_path)
    _run_logged(cfg)
    run_dir = tmp_path / "run"
    stale = [run_dir / d / ".tmp-rank0-killed" for d in ("", ".stages", "student", "baseline/student")]
    for path in stale:
        path.write_bytes(b"part of a checkpoint")
    _run_logged(_tiny_config(tmp_path, train={"lr": 0.02}))  # train and baseline redone: distill runs
    assert [p for p in stale if p.exists()] == []
    grid = TuneGrid(subclasses=(2,), betas=(0.5,), taus=(1.0,), steps=2, seeds=1)
    with ExclusiveLock(str(run_dir / ".lock-tune"), "a tune"):
        with pytest.raises(LockHeldError, match=r"the tune of work_dir .* is in use by another run"):
            tune(cfg, grid, log=lambda line: None)
    # with a capture made elsewhere, a work_dir not made yet (a review: the lock's file had no directory)
    elsewhere = _tiny_config(tmp_path / "new")
    tune(elsewhere, grid, capture_dir=str(run_dir / "capture" / "train"), log=lambda line: None)
    assert (tmp_path / "new" / "run" / "tune" / "tune.json").exists()


def test_records_written_before_session_66_redo_nothing(tmp_path):
    """A review of session 66's changes: records without the rows' fingerprints redid the capture
    (hours for a large teacher) as "input data changed"; an explicit subclass_weight 0.1 retrained;
    an old listing still held student/checkpoint.pt, so removing it retrained."""
    cfg = _tiny_config(tmp_path, train={"subclass_weight": 0.1})
    _run_logged(cfg)
    stages = tmp_path / "run" / ".stages"

    def edit(stage, change):
        record = json.loads((stages / f"{stage}.json").read_text())
        change(record)
        (stages / f"{stage}.json").write_text(json.dumps(record))

    edit("capture", lambda r: r["made_from"]["inputs"].pop("data"))
    edit("report", lambda r: [r["made_from"]["inputs"].pop(k) for k in ("test", "student_report")])
    edit("train", lambda r: r["made_from"]["settings"]["train"].update(subclass_weight=0.1))
    edit("train", lambda r: r["files"].update({"student/checkpoint.pt": 1}))
    (tmp_path / "run" / "student" / "checkpoint.pt").unlink()
    _, said = _run_logged(cfg)
    assert set(said.values()) == {"skipped (unchanged)"}, said
    assert "data" in json.loads((stages / "capture.json").read_text())["made_from"]["inputs"]  # brought up to date
    import tiny_task

    tiny_task.EDITED.add("val")
    try:
        _, said = _run_logged(cfg)
    finally:
        tiny_task.EDITED.discard("val")
    assert said["capture"] == "redone: input data changed"


def test_a_damaged_output_is_repaired_or_made_again_by_the_next_run(tmp_path):
    """A finished stage was skipped whenever its directory existed: a cut or removed file of its output
    failed the next stage on every rerun, whose error advised a command the run never reran. Now a
    skip looks at the files' sizes, a reader's checksum failure is recorded against the stage that
    wrote the file, and the next run repairs capture and targets in place and redoes the others."""
    from lelp_fast.run import DamagedOutputError

    cfg = _tiny_config(tmp_path, report={"kd_baseline": False})
    _run_logged(cfg)
    shard = tmp_path / "run" / "targets" / "shard-000000.log_targets.npy"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-4])
    _, said = _run_logged(cfg)
    assert said["targets"].startswith("repaired: ") and "shard-000000.log_targets.npy has" in said["targets"]
    assert shard.read_bytes() == intact and said["train"] == "skipped (unchanged)"

    raw = bytearray(intact)
    raw[-3] ^= 0x01  # the same size: found where the student's training reads it
    shard.write_bytes(bytes(raw))
    with pytest.raises(DamagedOutputError, match=r"shard-000000.log_targets.npy is corrupt.*"
                                                 r"run `lelp-fast run` again: it repairs the targets stage"):
        _run_logged(cfg, redo="train")
    _, said = _run_logged(cfg)
    assert said["targets"].startswith("repaired: ") and shard.read_bytes() == intact

    head = tmp_path / "run" / "capture" / "train" / "head.safetensors"
    raw = bytearray(head.read_bytes())
    raw[-3] ^= 0x40
    head.write_bytes(bytes(raw))
    with pytest.raises(DamagedOutputError, match="head.safetensors is corrupt.*it repairs the capture stage"):
        _run_logged(cfg, redo="fit")
    with pytest.warns(RuntimeWarning, match="head.safetensors is corrupt"):
        _, said = _run_logged(cfg)
    assert said["capture"].startswith("repaired: ") and said["fit"] == "resumed"

    (tmp_path / "run" / "student" / "student.safetensors").unlink()
    _, said = _run_logged(cfg)
    assert said["train"].startswith("redone: ") and "student.safetensors is missing" in said["train"]
    assert (tmp_path / "run" / "student" / "student.safetensors").exists()

    manifest = tmp_path / "run" / "targets" / "manifest.json"  # no finished output to repair: made again
    intact = manifest.read_bytes()
    manifest.write_bytes(intact[:-2])
    _, said = _run_logged(cfg)
    assert said["targets"].startswith("redone: ") and "manifest.json has" in said["targets"]
    assert said["train"] == "skipped (unchanged)"  # the same targets again
    manifest.write_bytes(intact.replace(b'"rows"', b'"rows:', 1))  # the same size: not the recorded manifest
    _, said = _run_logged(cfg, redo="train")
    assert said["targets"].startswith("redone: its output is not the one recorded") and manifest.read_bytes() == intact


def test_an_output_replaced_since_it_was_recorded_is_made_again(tmp_path):
    """A skipped stage loaded whatever file was on disk, and the stages after it took the digest
    recorded for the one it replaced (a session-65 audit): a projector refitted by hand at another
    beta, or targets written by hand, were trained on under the config's name; another student
    copied in was reported. A finished output is now checked against its recorded digest when its
    stage is skipped, and made again when it differs."""
    from lelp_fast import LELPProjector, generate_targets
    from lelp_fast.io.integrity import load_checked, save_checked
    from lelp_fast.offline import shards

    cfg = _tiny_config(tmp_path, report={"kd_baseline": False})
    _run_logged(cfg)
    run_dir = tmp_path / "run"
    first = _bytes(tmp_path, "projector.safetensors", "targets/manifest.json", "student/student.safetensors")

    other = LELPProjector(2, beta=0.05).fit(str(run_dir / "capture" / "train"))
    other.save(str(run_dir / "projector.safetensors"))
    _, said = _run_logged(cfg)
    assert said["fit"] == "redone: its output is not the one recorded (replaced or edited since)"
    assert _bytes(tmp_path, "projector.safetensors")["projector.safetensors"] == first["projector.safetensors"]
    assert said["targets"] == "skipped (unchanged)"  # the projector made again is the recorded one

    projector = LELPProjector.load(str(run_dir / "projector.safetensors"))
    shutil.rmtree(run_dir / "targets")
    generate_targets(projector, str(run_dir / "capture" / "train"), str(run_dir / "targets"), beta=0.05)
    _, said = _run_logged(cfg)
    assert said["targets"].startswith("redone: its output is not the one recorded")
    assert _bytes(tmp_path, "targets/manifest.json")["targets/manifest.json"] == first["targets/manifest.json"]

    student = run_dir / "student" / "student.safetensors"
    weights = load_checked(str(student))
    shards.write_atomically(str(student), save_checked({k: v + 0.5 for k, v in weights.items()}))
    _, said = _run_logged(cfg)
    assert said["train"].startswith("redone: its output is not the one recorded")
    assert student.read_bytes() == first["student/student.safetensors"]
    assert said["report"] == "skipped (unchanged)"  # the student made again is the one it reported

    report = run_dir / "report.json"  # the same size, not JSON: made again, not an error on every rerun
    report.write_bytes(b"#" + report.read_bytes()[1:])
    _, said = _run_logged(cfg)
    assert said["report"].startswith("redone: its output is not the one recorded")
    json.loads(report.read_text())


def test_a_damaged_student_report_names_the_file_and_the_next_run_redoes_its_stage(tmp_path):
    """A student/report.json that did not parse failed every rerun with "Expecting value: line 1
    column 1 (char 0)", naming no file."""
    from lelp_fast.run import DamagedOutputError

    cfg = _tiny_config(tmp_path, report={"kd_baseline": False})
    _run_logged(cfg)
    summary = tmp_path / "run" / "student" / "report.json"
    summary.write_bytes(b"#" + summary.read_bytes()[1:])
    with pytest.raises(DamagedOutputError, match=r"student/report.json is corrupt: not readable JSON.*"
                                                 r"it redoes the train stage"):
        _run_logged(cfg, redo="report")
    _, said = _run_logged(cfg)
    assert said["train"].startswith("redone: ") and json.loads(summary.read_text())["best"]


def test_a_damaged_file_is_held_against_the_stage_that_wrote_it(tmp_path):
    """A path was matched as a substring: under a work_dir named "baseline", the KD baseline's
    baseline/baseline/student/student.safetensors was taken for the student's, and train redone."""
    from lelp_fast.offline import provenance
    from lelp_fast.run import StageLog

    work_dir = str(tmp_path / "baseline")
    stages = StageLog(work_dir, log=lambda line: None)
    for stage, name in (("train", "student/student.safetensors"), ("baseline", "baseline/student/student.safetensors")):
        provenance.write(stages._path(stage), {"made_from": {}, "done": True, "files": {name: 1}})
    error = f"{work_dir}/baseline/student/student.safetensors fails its sha256 checksum (corrupt)"
    assert stages.mark_damaged(error) == "baseline"
    assert stages.mark_damaged(f"'{work_dir}/student/student.safetensors' is corrupt") == "train"
    assert stages.mark_damaged(f"{work_dir}/student/student.safetensors.tmp1 is corrupt") is None


def test_tune_holds_a_damaged_capture_against_the_capture_stage(tmp_path):
    """tune reads the capture itself, outside the run's stages: a corrupt head failed every tune and
    run, as the capture stage was skipped as unchanged."""
    from lelp_fast.run import DamagedOutputError, run
    from lelp_fast.tune import TuneGrid, tune

    cfg = _tiny_config(tmp_path)
    run(cfg, until="capture", log=lambda line: None)
    head = tmp_path / "run" / "capture" / "train" / "head.safetensors"
    raw = bytearray(head.read_bytes())
    raw[-3] ^= 0x40
    head.write_bytes(bytes(raw))
    with pytest.raises(DamagedOutputError, match="head.safetensors is corrupt.*it repairs the capture stage"):
        tune(cfg, TuneGrid(), log=lambda line: None)
    with pytest.warns(RuntimeWarning, match="head.safetensors is corrupt"):
        _, said = _run_logged(cfg, until="capture")
    assert said["capture"].startswith("repaired: ")


def test_redo_of_a_stage_after_until_is_refused(tmp_path):
    """``--until train --redo report`` ran up to train and redid nothing, silently."""
    from lelp_fast.run import run

    with pytest.raises(ValueError, match="redo 'report' comes after until 'train'"):
        run(_tiny_config(tmp_path), until="train", redo="report", log=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_execution_only_settings_reuse_the_outputs_and_redo_forces(tmp_path):
    _run_logged(_tiny_config(tmp_path))
    _, said = _run_logged(_tiny_config(tmp_path, fit={"chunk_mb": 8}, targets={"chunk_mb": 8}))
    assert set(said.values()) == {"skipped (unchanged)"}
    _, said = _run_logged(_tiny_config(tmp_path), redo="targets")
    assert said["fit"] == "skipped (unchanged)" and said["targets"] == "redone: forced (--redo)"
    assert said["train"] == "redone: forced (--redo)"


def test_an_execution_only_edit_does_not_stick_a_repair_or_a_resumed_fit(tmp_path, monkeypatch):
    """fit.chunk_mb and targets.chunk_mb change how fast, not what: yet a targets repair after an edit
    of targets.chunk_mb failed on every rerun ("written with other settings (chunk_bytes ...)"), and a
    killed fit resumed after an edit of fit.chunk_mb failed ("checkpoint ... written for other data
    or settings") until the edit was undone (a session-65 audit)."""
    from lelp_fast.fit import engine

    sections = {"report": {"kd_baseline": False}, "capture": {"batches_per_shard": 1}}
    _run_logged(_tiny_config(tmp_path, targets={"chunk_mb": 0.01}, **sections))
    shard = tmp_path / "run" / "targets" / "shard-000001.log_targets.npy"
    intact = shard.read_bytes()
    shard.write_bytes(intact[:100])
    _, said = _run_logged(_tiny_config(tmp_path, targets={"chunk_mb": 0.02}, **sections))
    assert said["targets"].startswith("repaired: ") and shard.read_bytes() == intact

    killed = _tiny_config(tmp_path / "k", fit={"chunk_mb": 0.002, "checkpoint_every": 1}, **sections)
    original = engine.accumulate
    monkeypatch.setattr(engine, "accumulate", lambda *a, **k: original(*a, stop_after_chunks=2, **k))
    with pytest.raises(KeyboardInterrupt):
        _run_logged(killed, until="fit")
    monkeypatch.setattr(engine, "accumulate", original)
    assert (tmp_path / "k" / "run" / "fit.ckpt").exists()
    lines = []
    from lelp_fast.run import run

    run(_tiny_config(tmp_path / "k", fit={"chunk_mb": 0.004, "checkpoint_every": 1}, **sections), until="fit",
        log=lines.append)
    over = "written otherwise (another fit.chunk_mb, or another version): starting the fit over"
    assert "[fit] resumed" in lines and any(over in line for line in lines), lines
    assert (tmp_path / "k" / "run" / "projector.safetensors").exists()


def test_the_teachers_test_accuracy_leaves_out_rows_without_a_label(tmp_path):
    """The report's teacher row counted -100 test rows as wrong answers (0.735 for 0.98 in a
    session-66 audit) where the students' accuracy leaves them out."""
    from tiny_task import task

    cfg = _tiny_config(tmp_path, task={"kwargs": {"unlabelled_test_every": 4}}, report={"kd_baseline": False})
    report, _ = _run_logged(cfg)
    made = task("unused", unlabelled_test_every=4)
    x, y = made.test.tensors
    with torch.no_grad():
        hits = made.teacher(x).argmax(1) == y
    labelled = y != -100
    assert int((~labelled).sum()) == 25
    assert report["teacher_test_accuracy"] == pytest.approx(float(hits[labelled].double().mean()))
    assert report["teacher_test_accuracy"] > float(hits.double().mean())


def test_the_report_has_the_kd_baseline_and_a_switch_turns_it_off(tmp_path):
    report, said = _run_logged(_tiny_config(tmp_path))
    kd = report["kd_baseline"]
    assert 0.3 < kd["kd"]["accuracy"] <= 1 and kd["difference"]["rows"] == 100
    lo, hi = kd["difference"]["interval"]
    assert lo <= kd["difference"]["accuracy"] <= hi
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| KD baseline (S=1" in md and "LELP minus KD:" in md
    report, said = _run_logged(_tiny_config(tmp_path, report={"kd_baseline": False}))
    assert said["baseline"].startswith("off") and said["report"].startswith("redone")
    assert "kd_baseline" not in report


def test_compact_targets_report_the_beta_they_were_read_at(tmp_path):
    report, _ = _run_logged(_tiny_config(tmp_path, targets={"compact": True, "beta": 1.0}, report={"kd_baseline": False}))
    assert report["targets_beta"] == 1.0
    assert "beta=1.0" in (tmp_path / "run" / "report.md").read_text()


def test_the_report_row_names_the_targets_tau_and_the_loss_tau(tmp_path):
    """Until session 58 the row said tau= with the targets' τ alone, which a reader took for the loss's
    (the one the student trains and is pooled at)."""
    _run_logged(_tiny_config(tmp_path, targets={"tau": 2.0}, train={"tau": 3.0}, report={"kd_baseline": False}))
    assert "targets tau=2.0, loss tau=3.0" in (tmp_path / "run" / "report.md").read_text()


def test_compact_targets_retrain_when_their_temperatures_change(tmp_path):
    """Compact targets store u and the teacher logits; β and τ are applied as the loop reads them, so the
    targets' manifest does not change with them. Until session 58 the student trained at β = 1 was kept
    (train skipped as unchanged) under a report that named the new β."""
    compact = {"targets": {"compact": True, "beta": 1.0}, "report": {"kd_baseline": False}}
    _run_logged(_tiny_config(tmp_path, **compact))
    first = _bytes(tmp_path, "student/student.safetensors")
    compact["targets"]["beta"] = 0.5
    report, said = _run_logged(_tiny_config(tmp_path, **compact))
    assert said["targets"] == "skipped (unchanged)"  # the same u and logits (regenerated until session 59)
    assert said["train"] == "redone: compact_temperatures.beta 1.0 -> 0.5"
    assert _bytes(tmp_path, "student/student.safetensors") != first and report["targets_beta"] == 0.5
    _, said = _run_logged(_tiny_config(tmp_path, **compact))
    assert said["train"] == "skipped (unchanged)"


def test_the_kd_baseline_is_kept_when_only_lambda_changes_and_the_report_states_the_lambda_that_trained(tmp_path):
    """λ weights the subclass part, which KD (S = 1) has none of: the baseline was retrained when it
    changed. And at S = 1 the report said lambda=0.1 where the student trained (and said) 1."""
    _run_logged(_tiny_config(tmp_path))
    # the default λ set by its value trains the same student: nothing redone (a session-66 audit: the
    # student was trained again, to the same bytes)
    _, said = _run_logged(_tiny_config(tmp_path, train={"subclass_weight": 0.1}))
    assert set(said.values()) == {"skipped (unchanged)"}, said
    _, said = _run_logged(_tiny_config(tmp_path, train={"subclass_weight": 1.0}))
    assert said["train"].startswith("redone: train.subclass_weight") and said["baseline"] == "skipped (unchanged)"
    report, _ = _run_logged(_tiny_config(tmp_path, fit={"subclasses": 1}, report={"kd_baseline": False}))
    trained = json.loads((tmp_path / "run" / "student" / "report.json").read_text())
    assert report["subclass_weight"] == 1.0 == trained["subclass_weight"]
    assert "lambda=1.0" in (tmp_path / "run" / "report.md").read_text()


def test_a_config_with_a_section_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("work_dir: x\ntask: {factory: 'a:b'}\ntrain: {epochs: 2}\ntrain: {epochs: 3}\n")
    with pytest.raises(ConfigError, match="'train' is given twice"):
        load_config(str(path))


def test_one_default_dtype_for_stored_targets():
    import inspect

    from lelp_fast.cli import build_parser
    from lelp_fast.offline import generate_targets

    python = inspect.signature(generate_targets).parameters["dtype"].default
    cli = build_parser().parse_args(["targets", "--projector", "p", "--embeddings", "e", "--out", "o"]).dtype
    config = parse_config({"work_dir": "x", "task": {"factory": "a:b"}}).targets.dtype
    assert python == cli == config


def test_set_overrides_and_print_config(capsys):
    import yaml

    assert main(["run", SMALL, "--set", "train.epochs=3", "--set", "fit.beta=0.1", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 3 and printed["fit"]["beta"] == 0.1 and printed["fit"]["subclasses"] == 4
    assert main(["run", SMALL, "--set", "train.epochs=0"]) == 2
    assert "train.epochs (--set): value must be an integer >= 1, got 0" in capsys.readouterr().err


# ---- issue 22: the subclass weight λ has one default, documented, in the API, the config and the CLI ----

def test_the_default_subclass_weight_is_one_value_in_the_api_the_config_and_the_cli(capsys):
    import yaml

    from lelp_fast import LELPLoss, reference
    from lelp_fast.cli import build_parser
    from lelp_fast.demo import DemoConfig
    from lelp_fast.quality import RealQualityConfig
    from lelp_fast.train import TrainSettings
    from lelp_fast.tune import TuneGrid

    def resolved(weight, divergence="kl"):
        return reference.resolve_subclass_weight(weight, divergence)

    assert reference.DEFAULT_SUBCLASS_WEIGHT == 0.1  # docs/results.md, "The subclass weight λ"
    api = LELPLoss(num_classes=2, n_subclasses=3).subclass_weight
    settings = TrainSettings()
    config = parse_config({"work_dir": "x", "task": {"factory": "a:b"}}).train
    assert main(["run", SMALL, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["train"]
    tune_cli = build_parser().parse_args(["tune", SMALL]).subclass_weights or TuneGrid().subclass_weights
    values = {api, resolved(settings.subclass_weight, settings.divergence), resolved(config.subclass_weight),
              resolved(printed["subclass_weight"], printed["divergence"]), *map(resolved, tune_cli),
              *map(resolved, TuneGrid().subclass_weights), resolved(RealQualityConfig().subclass_weight),
              resolved(DemoConfig().subclass_weight)}
    assert values == {reference.DEFAULT_SUBCLASS_WEIGHT}
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    assert f"default {reference.DEFAULT_SUBCLASS_WEIGHT}, the library's" in " ".join(capsys.readouterr().out.split())
    docs = open(os.path.join(HERE, "..", "docs", "user_path.md")).read()
    assert f"`train.subclass_weight` (default {reference.DEFAULT_SUBCLASS_WEIGHT}" in docs
    # λ = 1 (the paper's LELP) stays reachable; another divergence has no split and takes 1
    assert LELPLoss(num_classes=2, n_subclasses=3, subclass_weight=1.0).subclass_weight == 1.0
    assert parse_config({"work_dir": "x", "task": {"factory": "a:b"}, "train": {"subclass_weight": 1}}).train \
        .subclass_weight == 1.0
    assert LELPLoss(num_classes=2, n_subclasses=3, divergence="js").subclass_weight == 1.0
    assert resolved(None, "jsd") == 1.0
    with pytest.raises(ConfigError, match="train.subclass_weight = 0.5 needs train.divergence: kl"):
        parse_config({"work_dir": "x", "task": {"factory": "a:b"}, "train": {"divergence": "js", "subclass_weight": 0.5}})
    with pytest.raises(ValueError, match="train.subclass_weight = 0.5 needs train.divergence: kl"):
        TrainSettings(divergence="tvd", subclass_weight=0.5).check()
    TrainSettings(divergence="js").check()  # the default is no error with another divergence
