"""resdense deletes and overwrites only what it made: files a user plants in, or beside, each kind
of output folder survive every command that writes there, and the bounds of ``resdense.limits``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from resdense import limits, outputs
from resdense.cli import main
from resdense.errors import ConfigError, UserError

TINY = ["--model", "cifar_resnet", "-a", "depth=8", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
        "--train-subset", "128", "--set", "eval_batch_size=256", "--no-progress", "--precision", "fp32",
        "--no-tensorboard"]
STUDY = ["--preset", "smoke", "--data", "synthetic", "--seeds", "0", "--set", "precision=fp32", "--set", "tensorboard=False"]


def plant(folder: Path) -> dict[str, str]:
    """User files in ``folder``, some named like what resdense writes elsewhere; returns them."""
    files = {"my-notes.txt": "mine\n", "sub/f": "mine too\n", "index.html": "<p>my page</p>\n",
             "report.final.md": "my report\n"}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def still_there(folder: Path, files: dict[str, str]) -> bool:
    return all((folder / name).read_text() == text for name, text in files.items())


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_replaces_a_run_and_nothing_a_user_put_beside_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert outputs.kind_of(run) == "run"
    mine = plant(run)
    first = (run / "summary.json").read_text()
    assert main(["eval", "--checkpoint", str(run)]) == 0  # writes beside the run's files
    assert main(["export", "--checkpoint", str(run), "--format", "safetensors"]) == 0
    assert main(["export", "--checkpoint", str(run), "--format", "safetensors"]) == 0  # its own file: replaced
    assert main(["train", *TINY, "--seed", "1", "--out", str(run), "--overwrite"]) == 0
    assert still_there(run, mine)
    assert json.loads((run / "summary.json").read_text())["seed"] == 1 != json.loads(first)["seed"]
    # What resdense made for the old run is gone with it; the user's files are not.
    assert not (run / "eval_test.json").exists() and not (run / "model.safetensors").exists()
    imported = tmp_path / "imported"
    assert main(["import", str(run), "--out", str(imported)]) == 0
    theirs = plant(imported)
    assert main(["import", str(run), "--out", str(imported), "--overwrite"]) == 0
    assert still_there(imported, theirs) and (imported / "last" / "model.safetensors").is_file()


def test_a_folder_resdense_did_not_make_is_refused_by_every_writer_and_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    weights = tmp_path / "w.safetensors"
    assert main(["export", "--checkpoint", str(run), "--format", "safetensors", "--out", str(weights)]) == 0
    user = tmp_path / "user"
    user.mkdir()
    for name in ("notes.txt", "config.json", "metrics.csv", "sub/f"):  # the folder
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text("the user's\n")
    before = snapshot(user)
    for argv in (["train", *TINY, "--out", str(user)], ["train", *TINY, "--out", str(user), "--overwrite"],
                 ["train", *TINY, "--out", str(user), "--resume"],
                 ["train", *TINY, "--seeds", "0,1", "--out", str(user), "--overwrite"],
                 ["import", str(run), "--out", str(user), "--overwrite"],
                 ["study", "degradation", *STUDY, "--out", str(user)],
                 ["eval", "--checkpoint", str(run), "--out", str(user)],
                 ["analyze", "gradients", "--checkpoint", str(run), "--out", str(user)],
                 ["export", "--checkpoint", str(run), "--format", "safetensors", "--out", str(user / "notes.txt")],
                 ["bench", "peak", "--quick", "--out", str(user)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and ("not made by resdense" in err or "did not make" in err), (argv, err)
        assert "holds a run" not in err  # it does not: the message must not call it one
    assert snapshot(user) == before and not (user / "resdense.json").exists() and not (user / ".lock").exists()


def test_a_study_and_its_index_keep_a_users_files(tmp_path, capsys):
    root = tmp_path / "studies"
    study = root / "degradation"
    assert main(["study", "degradation", *STUDY, "--depths", "8,14", "--out", str(study)]) == 0
    assert outputs.kind_of(study) == "study"
    mine, in_run = plant(study), plant(study / "plain8-seed0")
    assert main(["study", "degradation", *STUDY, "--depths", "8,14", "--out", str(study)]) == 0  # all finished
    assert main(["report", str(study)]) == 0
    assert still_there(study, mine) and still_there(study / "plain8-seed0", in_run)
    # The index goes into the folder of studies, which resdense did not make: a user's index.html
    # there is not replaced, and nothing is redrawn before that is known.
    (root / "index.html").write_text("<p>my index</p>\n")
    report_time = (study / "report.html").stat().st_mtime_ns
    assert main(["report", str(root)]) == 2
    assert "index.html already exists" in capsys.readouterr().err
    assert (root / "index.html").read_text() == "<p>my index</p>\n"
    assert (study / "report.html").stat().st_mtime_ns == report_time
    (root / "index.html").unlink()
    assert main(["report", str(root)]) == 0 and main(["report", str(root)]) == 0  # its own index: rewritten


def test_seeds_overwrite_and_a_run_of_resdense_0_2_without_a_marker(tmp_path):
    out = tmp_path / "seeds"
    assert main(["train", *TINY, "--seeds", "0,1", "--out", str(out)]) == 0
    mine = plant(out)
    assert main(["train", *TINY, "--seeds", "0,1", "--out", str(out), "--overwrite"]) == 0
    assert still_there(out, mine) and outputs.kind_of(out) == "seeds"
    legacy = out / "seed0"
    (legacy / "resdense.json").unlink()  # as resdense 0.2 left it: recognised by its last/ link
    assert outputs.kind_of(legacy) == "run"
    kept = plant(legacy)
    assert main(["train", *TINY, "--out", str(legacy), "--overwrite"]) == 0
    assert still_there(legacy, kept) and (legacy / "resdense.json").is_file()


def test_the_kind_rules(tmp_path):
    assert outputs.kind_of(tmp_path / "missing") is None and outputs.is_empty(tmp_path / "missing")
    user = tmp_path / "user"
    user.mkdir()
    (user / "last").mkdir()  # a folder named like a run's link, but not a link into checkpoints/
    (user / "study.json").write_text('{"mine": 1}')
    assert outputs.kind_of(user) is None
    with pytest.raises(UserError, match="not made by resdense"):
        outputs.claim(user, outputs.RUN)
    with pytest.raises(UserError, match="does not hold a training run"):
        outputs.clear(user, outputs.RUN)
    study = outputs.claim(tmp_path / "s", outputs.STUDY)
    (study / "x").write_text("x")
    with pytest.raises(UserError, match="holds a study, not a training run"):
        outputs.check_writable(study, outputs.RUN)
    assert outputs.check_writable(study, outputs.OUTPUT) == "study"
    with pytest.raises(ConfigError, match="is a file"):
        outputs.check_writable(study / "x", outputs.RUN)


def test_config_bounds_measure_an_alias_bomb_without_expanding_it(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    bomb = yaml.safe_load("model_kwargs:\n" + "".join(f"  {line}\n" for line in levels))  # 9**12 leaves
    with pytest.raises(ConfigError, match="expands to more than"):
        limits.check_config_tree(bomb, "bomb.yaml")
    deep: dict = {}
    node = deep
    for _ in range(limits.MAX_CONFIG_DEPTH + 1):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ConfigError, match="nests deeper"):
        limits.check_config_tree(deep, "deep.json")
    limits.check_config_tree({"lr": 0.1, "milestones": [0.5, 0.75], "model_kwargs": {"depth": 20}}, "ok")
    with pytest.raises(ConfigError, match="more than a config file may be"):
        limits.check_config_size(limits.MAX_CONFIG_BYTES + 1, "big.yaml")


def test_image_and_jobs_bounds(monkeypatch):
    assert limits.image_too_large(8192, 8192) is None
    assert "8192x8192" in limits.image_too_large(12000, 12000)
    monkeypatch.setattr(limits, "usable_cores", lambda: 2)
    monkeypatch.setattr(limits, "available_memory", lambda: 5 * limits.JOB_MEMORY_BYTES + 1)
    assert limits.bound_jobs(2, 12) == (2, None)
    jobs, why = limits.bound_jobs(1000, 12)
    assert jobs == 2 and why.startswith("--jobs 1000: using 2") and "2 CPU cores" in why and "12 runs" in why
    monkeypatch.setattr(limits, "usable_cores", lambda: 64)
    assert limits.bound_jobs(1000, 12)[0] == 5  # memory for five
    assert limits.bound_jobs(8, 3)[0] == 3      # three runs left


def test_a_full_disk_in_a_study_says_to_run_the_study_again(tmp_path, monkeypatch):
    from resdense.errors import WriteError
    from resdense.studies import StudyConfig, engine

    def full_disk(*args, **kwargs):
        raise WriteError(f"{tmp_path}/s/plain8-seed0/metrics.jsonl: the disk is full (0 B free); the previous "
                         "checkpoint is intact; continue with the same command plus --resume (resdense train --out "
                         f"{tmp_path}/s/plain8-seed0 --resume ...)", 28, "metrics.jsonl")

    monkeypatch.setattr(engine, "work", full_disk)
    study = StudyConfig(study="degradation", data="synthetic", seeds=[0], preset="smoke", out=str(tmp_path / "s"),
                        options={"depths": [8, 14], "shortcut": "A"})
    with pytest.raises(WriteError) as failed:
        engine.run_study(study)
    message = str(failed.value)
    assert "the disk is full" in message and "resdense train" not in message
    assert f"run the same `resdense study` command again to continue {tmp_path / 's'}" in message
