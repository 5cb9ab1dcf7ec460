"""The lelp-fast command line, run in-process on small files."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from lelp_fast import LELPProjector, TargetsDataset
from lelp_fast.cli import main
from conftest import make_problem


@pytest.fixture
def npy_inputs(tmp_path):
    h, w, b, _ = make_problem(n=700, d=20, num_classes=3, seed=41)
    h = (h - h.mean(0)).float()
    y = (h.double() @ w.T + b).argmax(1)
    paths = {}
    for name, arr in {"E": h.numpy().astype(np.float16), "y": y.numpy(), "W": w.float().numpy(),
                      "b": b.float().numpy(), "z": (h.double() @ w.T + b).float().numpy()}.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], arr)
    return paths, tmp_path


def test_fit_then_targets(npy_inputs):
    paths, tmp = npy_inputs
    proj_path = str(tmp / "p.safetensors")
    assert main(["fit", "--embeddings", paths["E"], "--labels", paths["y"], "--head-weight", paths["W"],
                 "--head-bias", paths["b"], "--subclasses", "3", "--chunk-mb", "0.002", "--quiet",
                 "--out", proj_path]) == 0
    emb = torch.from_numpy(np.load(paths["E"]))
    want_proj = LELPProjector(3).fit(emb, torch.from_numpy(np.load(paths["y"])),
                                     head_weight=np.load(paths["W"]), head_bias=np.load(paths["b"]))
    got_proj = LELPProjector.load(proj_path)
    torch.testing.assert_close(got_proj.A, want_proj.A, rtol=1e-5, atol=1e-6)

    out = str(tmp / "t32")
    assert main(["targets", "--projector", proj_path, "--embeddings", paths["E"], "--out", out,
                 "--dtype", "float32", "--chunk-mb", "0.01", "--quiet"]) == 0
    ds = TargetsDataset(out)
    assert len(ds) == 700 and len(ds.shards) > 1 and ds.settings["dtype"] == "float32"
    torch.testing.assert_close(ds.targets(range(700)), got_proj.targets(emb, backend="torch"), atol=1e-5, rtol=1e-5)

    out16 = str(tmp / "t16")
    assert main(["targets", "--projector", proj_path, "--embeddings", paths["E"], "--teacher-logits",
                 paths["z"], "--beta", "0.5", "--format", "safetensors", "--out", out16, "--quiet"]) == 0
    want = got_proj.targets(emb, torch.from_numpy(np.load(paths["z"])), beta=0.5, backend="torch")
    got = TargetsDataset(out16).targets(range(700))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-3)
    assert sorted(p.name for p in tmp.rglob(".tmp*")) == []


def test_fit_without_head_uses_labels_for_num_classes(npy_inputs):
    paths, tmp = npy_inputs
    out = str(tmp / "p2.safetensors")
    assert main(["fit", "--embeddings", paths["E"], "--labels", paths["y"], "--subclasses", "2",
                 "--quiet", "--out", out]) == 0
    p = LELPProjector.load(out)
    assert p.num_classes == 3 and not p.null_space and p.head_weight is None


def test_errors_name_the_argument(npy_inputs, capsys):
    paths, tmp = npy_inputs
    with pytest.raises(SystemExit, match="--labels .*: no such file"):
        main(["fit", "--embeddings", paths["E"], "--labels", str(tmp / "missing.npy"), "--out", "x"])
    assert main(["fit", "--embeddings", paths["E"], "--labels", paths["b"], "--out", "x", "--quiet"]) == 2
    assert "labels has 3 rows but embeddings has 700" in capsys.readouterr().err
    assert main(["fit", "--embeddings", paths["E"], "--labels", paths["y"], "--subclasses", "50",
                 "--quiet", "--out", str(tmp / "x.safetensors")]) == 2
    # no head, so nothing is projected out: the message names d (until session 58 it named d - rank(W))
    assert "n_subclasses=50 exceeds the embeddings' dimension d = 20" in capsys.readouterr().err


def test_fit_safetensors_and_parquet_then_inspect(npy_inputs, capsys):
    paths, tmp = npy_inputs
    emb = torch.from_numpy(np.load(paths["E"]))
    labels = torch.from_numpy(np.load(paths["y"]))
    from safetensors.torch import save_file
    import pyarrow as pa
    import pyarrow.parquet as pq

    save_file({"emb": emb, "y": labels}, str(tmp / "d.safetensors"))
    pq.write_table(pa.table({"embeddings": pa.array(list(emb.float().numpy())), "labels": pa.array(labels.numpy())}),
                   str(tmp / "d.parquet"))
    want = LELPProjector(3).fit(emb, labels)
    for src, extra in ((str(tmp / "d.safetensors"), ["--embeddings-key", "emb", "--labels-key", "y"]),
                       (str(tmp / "d.parquet"), [])):
        out = str(tmp / "p.safetensors")
        assert main(["fit", "--embeddings", src, *extra, "--subclasses", "3", "--quiet", "--out", out]) == 0
        torch.testing.assert_close(LELPProjector.load(out).A, want.A, rtol=1e-4, atol=1e-5)
    png = str(tmp / "spectrum.png")
    assert main(["inspect", out, "--plot", png]) == 0
    printed = capsys.readouterr().out
    assert "class 2:" in printed and "captured variance" in printed
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fit_checkpoint_resume_flags(npy_inputs):
    paths, tmp = npy_inputs
    ckpt, out = str(tmp / "fit.ckpt"), str(tmp / "p.safetensors")
    args = ["fit", "--embeddings", paths["E"], "--labels", paths["y"], "--subclasses", "3", "--chunk-mb", "0.002",
            "--checkpoint", ckpt, "--checkpoint-every", "1", "--quiet", "--out", out]
    assert main(args) == 0 and not os.path.exists(ckpt)
    assert main(args + ["--resume"]) == 0  # nothing to resume: a fresh fit


def test_demo_runs_and_writes_json(tmp_path, capsys):
    out = str(tmp_path / "demo.json")
    assert main(["demo", "--seeds", "1", "--quiet", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| LELP |" in printed and "| vanilla KD |" in printed and "linear student" in printed
    result = json.loads(open(out).read())
    for student in result["students"].values():
        methods = [r["method"] for r in student["rows"]]
        assert methods == ["teacher", "hard labels", "vanilla KD", "LELP", "oracle"]
        assert all(0.5 < r["accuracy_mean"] <= 1.0 for r in student["rows"])
        assert student["paired"]["vanilla KD"]["diff_mean"] == 0.0 and "wins" in student["paired"]["LELP"]


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "lelp_fast", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "lelp-fast demo" in res.stdout


@pytest.mark.parametrize("argv, flag", [
    (["fit", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["fit", "--chunk-mb", "inf"], "--chunk-mb"),
    (["fit", "--chunk-mb", "nan"], "--chunk-mb"),
    (["fit", "--chunk-mb", "1e-9"], "--chunk-mb"),
    (["targets", "--chunk-mb", "0"], "--chunk-mb"),
    (["fit", "--num-classes", "-1"], "--num-classes"),
    (["demo", "--seeds", "0"], "--seeds"),
    (["demo", "--tau", "0"], "--tau"),  # these three: refused by the library, without the flag's name
    (["targets", "--tau", "-1"], "--tau"),
    (["targets", "--beta", "nan"], "--beta"),
    (["tune", "--taus", "1", "inf"], "--taus"),  # refused at the first proxy's loss, unnamed
])
def test_bad_flags_are_one_line_errors_naming_the_flag(npy_inputs, capsys, argv, flag):
    """These gave ZeroDivisionError, KeyError or a late traceback."""
    paths, tmp = npy_inputs
    base = {"fit": ["--embeddings", paths["E"], "--labels", paths["y"], "--out", str(tmp / "p.safetensors")],
            "targets": ["--projector", "p", "--embeddings", paths["E"], "--out", str(tmp / "t")], "demo": [],
            "tune": []}
    with pytest.raises(SystemExit) as exc:
        main(argv[:1] + base[argv[0]] + argv[1:])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "Traceback" not in err


def test_missing_or_unwritable_files_are_named_before_the_fit(npy_inputs, capsys, tmp_path):
    paths, tmp = npy_inputs
    with pytest.raises(SystemExit, match="projector .*missing.safetensors: no such file"):
        main(["inspect", str(tmp / "missing.safetensors")])
    bad = tmp / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(SystemExit, match="--head-weight .*bad.npy: not a readable .npy file"):
        main(["fit", "--embeddings", paths["E"], "--labels", paths["y"], "--head-weight", str(bad), "--out", "x"])
    fit = ["fit", "--embeddings", paths["E"], "--labels", paths["y"], "--quiet"]
    with pytest.raises(SystemExit, match="--out .*no-such-dir/p.safetensors: cannot write there"):
        main(fit + ["--out", str(tmp / "no-such-dir" / "p.safetensors")])
    with pytest.raises(SystemExit, match="--checkpoint .*cannot write there"):
        main(fit + ["--out", str(tmp / "p.safetensors"), "--checkpoint", str(tmp / "no-such-dir" / "c")])


def test_flags_that_would_be_ignored_or_checked_late_are_refused_first(npy_inputs, capsys, tmp_path):
    """Until session 58 each of these ran: demo and bench with an --out they could not write failed only
    after their whole run; --beta/--tau with --compact, teacher-outputs' --tau without --top-k and
    export --hf-model's --format were accepted and ignored."""
    paths, tmp = npy_inputs
    cases = [
        (["demo", "--out", str(tmp_path / "missing" / "t.md")], "--out .*t.md: cannot write there"),
        (["bench", "quality", "--dataset", "digits-low", "--out", str(tmp_path / "missing" / "q.json")],
         "--out .*q.json: cannot write there"),
        (["targets", "--projector", "p.safetensors", "--embeddings", paths["E"], "--out", str(tmp_path / "t"),
          "--compact", "--beta", "0.5"], "--beta and --tau are chosen when --compact targets are read"),
        (["teacher-outputs", "--logits", paths["z"], "--tau", "2", "--out", str(tmp_path / "kd")],
         "--tau is the temperature of --top-k's log-probabilities"),
        (["fit", "--embeddings", str(tmp_path / "E.parquet"), "--labels", paths["y"], "--out", str(tmp_path / "p")],
         "a Parquet file's labels and logits are its columns"),
        (["export", "--hf-model", str(tmp_path / "student"), "--subclasses", "2", "--format", "onnx",
          "--out", str(tmp_path / "cls")], "--format and --set are for a run CONFIG's student"),
    ]
    (tmp_path / "E.parquet").write_bytes(b"")  # refused by its flags before it is read
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(argv)
    assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "kd")
    help_text = subprocess.run([sys.executable, "-m", "lelp_fast", "tune", "--help"], capture_output=True,
                               text=True).stdout
    assert "95 % interval" in " ".join(help_text.split())


def test_warnings_are_one_line_naming_what_happened(npy_inputs, tmp_path):
    """A corrupt shard in finished targets is rewritten with a warning. Until session 58 the command
    printed it as Python does: the library's file and line, the category, then the echoed source line."""
    paths, _ = npy_inputs
    projector, out = str(tmp_path / "p.safetensors"), str(tmp_path / "t")
    LELPProjector(3).fit(torch.from_numpy(np.load(paths["E"])), torch.from_numpy(np.load(paths["y"])),
                         head_weight=np.load(paths["W"]), head_bias=np.load(paths["b"])).save(projector)
    argv = [sys.executable, "-m", "lelp_fast", "targets", "--projector", projector, "--embeddings", paths["E"],
            "--out", out, "--chunk-mb", "0.01", "--quiet"]
    assert subprocess.run(argv, capture_output=True, timeout=300).returncode == 0
    shard = sorted(p for p in os.listdir(out) if p.startswith("shard-"))[1]
    with open(os.path.join(out, shard), "r+b") as f:
        f.seek(200)
        f.write(b"\xff")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert f"warning: {out}: 1 shard(s) missing or corrupt (shard file {os.path.join(out, shard)} is corrupt: its " \
           "xxh3_128 checksum does not match the record); rewriting them" in done.stderr.splitlines(), done.stderr
    assert "RuntimeWarning" not in done.stderr and "pipeline.py" not in done.stderr


def test_a_reader_that_stops_early_is_no_error(npy_inputs, tmp_path):
    """``lelp-fast inspect P | head -1``: once the reader has gone, the command stops without a word.
    Until session 58 it printed "error: [Errno 32] Broken pipe" and exited with 2."""
    paths, _ = npy_inputs
    projector = str(tmp_path / "p.safetensors")
    LELPProjector(3).fit(torch.from_numpy(np.load(paths["E"])), torch.from_numpy(np.load(paths["y"]))).save(projector)
    script = ("import os, sys\n"
              "read, write = os.pipe()\n"
              "os.close(read)  # the reader has gone\n"
              "sys.stdout = os.fdopen(write, 'w', buffering=1)\n"
              "from lelp_fast.cli import main\n"
              f"code = main(['inspect', {projector!r}])\n"
              "sys.stderr.write('exit %d\\n' % code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines() == ["exit 1"], done.stderr


def test_a_second_fit_on_one_out_is_refused(npy_inputs, capsys):
    from lelp_fast.io.locks import ExclusiveLock

    paths, tmp = npy_inputs
    out = str(tmp / "p.safetensors")
    with ExclusiveLock(out + ".lock", "test"):
        assert main(["fit", "--embeddings", paths["E"], "--labels", paths["y"], "--quiet", "--out", out]) == 2
    assert "--out " in capsys.readouterr().err and not os.path.exists(out)
    assert main(["fit", "--embeddings", paths["E"], "--labels", paths["y"], "--quiet", "--out", out]) == 0


def test_ctrl_c_is_one_line_saying_the_run_can_be_resumed(monkeypatch, capsys):
    from lelp_fast import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_run", interrupted)
    assert cli.main(["run", "any.yaml"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rerun the same command to resume" in err


def test_cli_and_config_refuse_what_the_api_refuses():
    from lelp_fast.cli import build_parser
    from lelp_fast.config import ConfigError, parse_config

    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--embeddings", "e", "--out", "o", "--subclasses", "0"])
    for bad in (True, 0, 2.5):
        with pytest.raises(ConfigError, match="fit.subclasses: value must be an integer >= 1"):
            parse_config({"work_dir": "x", "task": {"factory": "a:b"}, "fit": {"subclasses": bad}})
    with pytest.raises(ConfigError, match="train.alpha: value must be a finite number >= 0, got nan"):
        parse_config({"work_dir": "x", "task": {"factory": "a:b"}, "train": {"alpha": float("nan")}})


@pytest.mark.parametrize("argv, message", [
    (["fit", "--embeddings", "{tmp}/missing.npy", "--out", "{tmp}/p"], "--embeddings {tmp}/missing.npy: no such file"),
    (["targets", "--projector", "{tmp}/missing.safetensors", "--embeddings", "{E}", "--out", "{tmp}/t"],
     "--projector {tmp}/missing.safetensors: no such file"),
    (["teacher-outputs", "--out", "{tmp}/o"], "give --logits FILE.npy or --capture DIR (one of the two)"),
    (["export", "--out", "{tmp}/x"], "give a run CONFIG or --hf-model DIR (one of the two)"),
])
def test_argument_errors_of_the_commands_exit_2_as_argparse_does(npy_inputs, capsys, argv, message):
    """The commands' own argument errors (a missing file, flags that go together) left by
    SystemExit("error: ...") with status 1, where argparse's errors and the library's exit 2: a
    script could not tell a bad argument from a failed run. Now 2, with the one-line message
    printed once."""
    paths, tmp = npy_inputs
    argv = [a.format(tmp=tmp, E=paths["E"]) for a in argv]
    message = "error: " + message.format(tmp=tmp)
    with pytest.raises(SystemExit, match=re.escape(message)) as exc:
        main(argv)
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == message
    if argv[0] == "fit":  # and as a process: its exit status (one is enough: each starts torch)
        done = subprocess.run([sys.executable, "-m", "lelp_fast", *argv], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.strip() == message, (done.returncode, done.stderr)


@pytest.mark.parametrize("argv, message", [
    (["fit", "--embeddings", "{text}", "--labels", "{y}", "--out", "{tmp}/p"], "embeddings file {text} holds <U1"),
    (["fit", "--embeddings", "{E}", "--labels", "{text1}", "--out", "{tmp}/p"], "labels file {text1} holds <U1"),
    (["teacher-outputs", "--logits", "{text}", "--out", "{tmp}/o"], "--logits {text}: holds <U1"),
])
def test_a_npy_of_text_is_a_one_line_error_naming_the_file(npy_inputs, capsys, argv, message):
    """A .npy of strings reached torch.from_numpy: a TypeError's traceback, exit status 1."""
    paths, tmp = npy_inputs
    text, text1 = str(tmp / "text.npy"), str(tmp / "text1.npy")
    np.save(text, np.array([["a"] * 20] * 700))
    np.save(text1, np.array(["a"] * 700))
    names = dict(tmp=tmp, text=text, text1=text1, y=paths["y"], E=paths["E"])
    try:  # the library's errors return 2, the commands' own raise SystemExit(2)
        code = main([a.format(**names) for a in argv] + ["--quiet"] * (argv[0] == "fit"))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: " + message.format(**names)), err


def test_fit_errors_give_the_flags_a_command_user_types(npy_inputs, capsys):
    """The fit's errors named Python spellings only (nan_policy='skip', assign="teacher"), and a fit
    without --labels asked for --num-classes first, then, given it, for the labels (a session-64
    walkthrough). The flags are now named, and the missing labels first."""
    paths, tmp = npy_inputs
    h = np.load(paths["E"]).astype(np.float32)
    h[5, 0] = np.nan
    np.save(tmp / "nan.npy", h)
    out = ["--out", str(tmp / "p.safetensors"), "--quiet"]
    assert main(["fit", "--embeddings", str(tmp / "nan.npy"), "--labels", paths["y"], *out]) == 2
    assert "--nan-policy skip" in capsys.readouterr().err
    for extra in ([], ["--num-classes", "3"]):
        assert main(["fit", "--embeddings", paths["E"], *extra, *out]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "labels are required (--labels)" in err and "--assign teacher" in err, err


def test_a_fit_given_the_head_weight_alone_says_which_bias_it_took(npy_inputs, capsys):
    """Without --head-bias on a bare E.npy the fit used a zero bias (documented), but said nothing;
    its targets from embeddings then differed by up to 25 in log space (a session-65 walkthrough)."""
    paths, tmp = npy_inputs
    common = ["fit", "--embeddings", paths["E"], "--labels", paths["y"], "--head-weight", paths["W"], "--subclasses",
              "2", "--quiet"]
    assert main(common + ["--out", str(tmp / "zero.safetensors")]) == 0
    assert "head bias: none given and no teacher logits to read it from: zero (pass --head-bias" in capsys.readouterr().out
    assert main(common + ["--teacher-logits", paths["z"], "--out", str(tmp / "read.safetensors")]) == 0
    assert "head bias: none given: the one the teacher logits show, to ±" in capsys.readouterr().out
    assert main(common + ["--head-bias", paths["b"], "--out", str(tmp / "given.safetensors")]) == 0
    assert "head bias" not in capsys.readouterr().out
