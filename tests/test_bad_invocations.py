"""A table of wrong commands, across every subcommand, each run in a process of its own.

Each must exit 2 with one line on stderr and no traceback, and leave nothing new behind: no file
in its own scratch folder (its working directory, HOME, cache and temporary folder), and nothing
changed in the shared fixtures it points at. Grow the table whenever a flag lands.

A case's process is forked from a server that has imported torch and resdense once (what a fresh
``python -m resdense`` spends most of its start on), with the case's own environment, working
directory and stderr (file descriptor 2, so C-level output counts too); every ``SUBPROCESS_EVERY``-th
case runs as a real ``python -m resdense`` instead, so import-time output is still seen.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import struct
import subprocess
import sys
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

from resdense.models import create_model
from resdense.train.config import TrainConfig
from resdense.train.runner import train

SRC = str(Path(__file__).resolve().parents[1] / "src")
SYN = ["--data", "synthetic", "--model", "cifar_resnet", "-a", "depth=8", "--epochs", "1", "--no-progress"]

# (id, argv with {S}: the shared fixtures, {T}: the case's own scratch folder, {RUN}: a trained run)
CASES: list[tuple[str, list[str]]] = [
    # --- train: names, numbers, types ---
    ("train-unknown-model", ["train", "--model", "bogus", "--out", "{T}/r"]),
    ("train-unknown-data", ["train", "--data", "nosuch", "--out", "{T}/r"]),
    ("train-unknown-recipe", ["train", *SYN, "--recipe", "bogus", "--out", "{T}/r"]),
    ("train-zero-epochs", ["train", *SYN, "--epochs", "0", "--out", "{T}/r"]),
    ("train-negative-epochs", ["train", *SYN, "--epochs", "-3", "--out", "{T}/r"]),
    ("train-zero-iterations", ["train", *SYN, "--iterations", "0", "--out", "{T}/r"]),
    ("train-nan-lr", ["train", *SYN, "--lr", "nan", "--out", "{T}/r"]),
    ("train-inf-lr", ["train", *SYN, "--lr", "inf", "--out", "{T}/r"]),
    ("train-negative-lr", ["train", *SYN, "--lr", "-0.1", "--out", "{T}/r"]),
    ("train-set-nan-lr", ["train", *SYN, "--set", "lr=nan", "--out", "{T}/r"]),
    ("train-set-without-value", ["train", *SYN, "--set", "lr", "--out", "{T}/r"]),
    ("train-set-unknown-key", ["train", *SYN, "--set", "bogus=1", "--out", "{T}/r"]),
    ("train-set-float-epochs", ["train", *SYN, "--set", "epochs=1.5", "--out", "{T}/r"]),
    ("train-set-model-kwargs-number", ["train", *SYN, "--set", "model_kwargs=5", "--out", "{T}/r"]),
    ("train-set-negative-wd", ["train", *SYN, "--set", "weight_decay=-1", "--out", "{T}/r"]),
    ("train-set-momentum-one", ["train", *SYN, "--set", "momentum=1.0", "--out", "{T}/r"]),
    ("train-set-label-smoothing", ["train", *SYN, "--set", "label_smoothing=2", "--out", "{T}/r"]),
    ("train-set-on-divergence", ["train", *SYN, "--set", "on_divergence=maybe", "--out", "{T}/r"]),
    ("train-zero-batch", ["train", *SYN, "--batch-size", "0", "--out", "{T}/r"]),
    ("train-text-batch", ["train", *SYN, "--batch-size", "abc", "--out", "{T}/r"]),
    ("train-huge-batch", ["train", *SYN, "--batch-size", "100000", "--out", "{T}/r"]),
    ("train-zero-threads", ["train", *SYN, "--threads", "0", "--out", "{T}/r"]),
    ("train-zero-image-size", ["train", *SYN, "--image-size", "0", "--out", "{T}/r"]),
    ("train-zero-subset", ["train", *SYN, "--train-subset", "0", "--out", "{T}/r"]),
    ("train-huge-subset", ["train", *SYN, "--train-subset", "10000000", "--out", "{T}/r"]),
    ("train-negative-val-size", ["train", *SYN, "--val-size", "-1", "--out", "{T}/r"]),
    ("train-zero-checkpoint-every", ["train", *SYN, "--checkpoint-every", "0", "--out", "{T}/r"]),
    ("train-negative-backbone-lr", ["train", *SYN, "--backbone-lr-factor", "-1", "--out", "{T}/r"]),
    ("train-bad-precision", ["train", *SYN, "--precision", "fp64", "--out", "{T}/r"]),
    ("train-bad-bad-images", ["train", *SYN, "--bad-images", "maybe", "--out", "{T}/r"]),
    ("train-unknown-device", ["train", *SYN, "--device", "tpu", "--out", "{T}/r"]),
    ("train-zero-nproc", ["train", *SYN, "--nproc", "0", "--out", "{T}/r"]),
    ("train-sync-bn-alone", ["train", *SYN, "--sync-bn", "--out", "{T}/r"]),
    ("train-no-out", ["train", *SYN]),
    ("train-resume-and-overwrite", ["train", *SYN, "--resume", "--overwrite", "--out", "{T}/r"]),
    # --- train: seeds ---
    ("train-seeds-empty", ["train", *SYN, "--seeds", ",", "--out", "{T}/r"]),
    ("train-seeds-repeated", ["train", *SYN, "--seeds", "1,1", "--out", "{T}/r"]),
    ("train-seeds-words", ["train", *SYN, "--seeds", "a,b", "--out", "{T}/r"]),
    # --- train: model settings ---
    ("train-unknown-model-setting", ["train", *SYN, "-a", "bogus=3", "--out", "{T}/r"]),
    ("train-bad-depth", ["train", *SYN, "-a", "depth=21", "--out", "{T}/r"]),
    ("train-bad-shortcut", ["train", *SYN, "-a", "shortcut=Z", "--out", "{T}/r"]),
    ("train-arg-without-value", ["train", *SYN, "-a", "depth", "--out", "{T}/r"]),
    # --- train: paths ---
    ("train-data-is-a-file", ["train", "--data", "{S}/notes.txt", "--out", "{T}/r"]),
    ("train-data-empty-folder", ["train", "--data", "{S}/empty", "--out", "{T}/r"]),
    ("train-data-one-class", ["train", "--data", "{S}/oneclass", "--epochs", "1", "--out", "{T}/r"]),
    ("train-data-huge-image", ["train", "--data", "{S}/hugeimages", "--epochs", "1", "--out", "{T}/r"]),
    ("train-data-dir-is-a-file", ["train", "--data", "fashion-mnist", "--data-dir", "{S}/notes.txt", "--epochs", "1",
                                  "--out", "{T}/r"]),
    ("train-out-is-a-file", ["train", *SYN, "--out", "{S}/notes.txt"]),
    ("train-out-user-folder", ["train", *SYN, "--out", "{S}/user"]),
    ("train-out-user-folder-overwrite", ["train", *SYN, "--out", "{S}/user", "--overwrite"]),
    ("train-out-user-folder-resume", ["train", *SYN, "--out", "{S}/user", "--resume"]),
    ("train-out-holds-a-run", ["train", *SYN, "--out", "{RUN}"]),
    ("train-seeds-out-user-folder", ["train", *SYN, "--seeds", "0,1", "--out", "{S}/user"]),
    ("train-init-from-missing", ["train", *SYN, "--init-from", "{S}/missing", "--out", "{T}/r"]),
    ("train-init-from-text", ["train", *SYN, "--init-from", "{S}/notes.txt", "--out", "{T}/r"]),
    # --- train: hostile config files ---
    ("config-not-yaml-or-json", ["train", *SYN, "--config", "{S}/notes.txt", "--out", "{T}/r"]),
    ("config-missing", ["train", *SYN, "--config", "{S}/missing.yaml", "--out", "{T}/r"]),
    ("config-alias-bomb", ["train", *SYN, "--config", "{S}/bomb.yaml", "--out", "{T}/r"]),
    ("config-deep", ["train", *SYN, "--config", "{S}/deep.json", "--out", "{T}/r"]),
    ("config-too-big", ["train", *SYN, "--config", "{S}/big.yaml", "--out", "{T}/r"]),
    ("config-a-list", ["train", *SYN, "--config", "{S}/list.yaml", "--out", "{T}/r"]),
    ("config-malformed", ["train", *SYN, "--config", "{S}/bad.yaml", "--out", "{T}/r"]),
    ("config-unknown-key", ["train", *SYN, "--config", "{S}/unknown.json", "--out", "{T}/r"]),
    ("config-is-a-folder", ["train", *SYN, "--config", "{S}/empty", "--out", "{T}/r"]),
    # --- eval ---
    ("eval-missing-run", ["eval", "--checkpoint", "{S}/missing"]),
    ("eval-folder-without-checkpoint", ["eval", "--checkpoint", "{S}/user"]),
    ("eval-file-as-run", ["eval", "--checkpoint", "{S}/notes.txt"]),
    ("eval-bad-split", ["eval", "--checkpoint", "{RUN}", "--split", "train"]),
    ("eval-unknown-data", ["eval", "--checkpoint", "{RUN}", "--data", "nosuch"]),
    ("eval-out-user-folder", ["eval", "--checkpoint", "{RUN}", "--out", "{S}/user"]),
    ("eval-out-is-a-file", ["eval", "--checkpoint", "{RUN}", "--out", "{S}/notes.txt"]),
    # --- predict ---
    ("predict-missing-image", ["predict", "--checkpoint", "{RUN}", "{S}/missing.png"]),
    ("predict-20000-square-image", ["predict", "--checkpoint", "{RUN}", "{S}/huge20000.png"]),
    ("predict-12000-square-image", ["predict", "--checkpoint", "{RUN}", "{S}/huge12000.png"]),
    ("predict-text-as-image", ["predict", "--checkpoint", "{RUN}", "{S}/notes.txt"]),
    ("predict-folder-as-image", ["predict", "--checkpoint", "{RUN}", "{S}/empty"]),
    ("predict-zero-top-k", ["predict", "--checkpoint", "{RUN}", "--top-k", "0", "{S}/ok.png"]),
    ("predict-missing-run", ["predict", "--checkpoint", "{S}/missing", "{S}/ok.png"]),
    ("predict-no-images", ["predict", "--checkpoint", "{RUN}"]),
    # --- study ---
    ("study-unknown", ["study", "bogus", "--out", "{T}/s"]),
    ("study-missing-data", ["study", "degradation", "--data", "/nonexistent", "--out", "{T}/s"]),
    ("study-bad-depths", ["study", "degradation", "--depths", "21,56", "--out", "{T}/s"]),
    ("study-one-depth", ["study", "degradation", "--depths", "20", "--out", "{T}/s"]),
    ("study-unknown-preset", ["study", "degradation", "--preset", "bogus", "--out", "{T}/s"]),
    ("study-zero-jobs", ["study", "degradation", "--jobs", "0", "--out", "{T}/s"]),
    ("study-empty-seeds", ["study", "degradation", "--seeds", ",", "--out", "{T}/s"]),
    ("study-set-nan", ["study", "degradation", "--set", "lr=nan", "--out", "{T}/s"]),
    ("study-set-unknown", ["study", "degradation", "--set", "bogus=1", "--out", "{T}/s"]),
    ("study-out-user-folder", ["study", "degradation", "--out", "{S}/user"]),
    ("study-out-is-a-file", ["study", "degradation", "--out", "{S}/notes.txt"]),
    ("study-out-holds-a-run", ["study", "degradation", "--out", "{RUN}"]),
    ("study-shortcuts-bad-depth", ["study", "shortcuts", "--depth", "21", "--out", "{T}/s"]),
    ("study-no-out", ["study", "degradation"]),
    # --- report ---
    ("report-missing", ["report", "{S}/missing"]),
    ("report-user-folder", ["report", "{S}/user"]),
    ("report-file", ["report", "{S}/notes.txt"]),
    ("report-empty-folder", ["report", "{S}/empty"]),
    # --- analyze ---
    ("analyze-unknown", ["analyze", "bogus", "--checkpoint", "{RUN}"]),
    ("analyze-nothing-to-analyze", ["analyze", "gradients"]),
    ("analyze-missing-run", ["analyze", "gradients", "--checkpoint", "{S}/missing"]),
    ("analyze-user-folder-as-study", ["analyze", "gradients", "--study", "{S}/user"]),
    ("analyze-out-user-folder", ["analyze", "gradients", "--checkpoint", "{RUN}", "--out", "{S}/user"]),
    ("analyze-zero-batches", ["analyze", "gradients", "--checkpoint", "{RUN}", "--batches", "0"]),
    ("analyze-reuse-without-densenet", ["analyze", "reuse", "--checkpoint", "{RUN}", "--out", "{T}/a"]),
    # --- import ---
    ("import-missing-file", ["import", "{S}/missing.pth", "--model", "resnet20", "--out", "{T}/i"]),
    ("import-text-file", ["import", "{S}/notes.txt", "--model", "resnet20", "--out", "{T}/i"]),
    ("import-unknown-model", ["import", "{S}/w.pth", "--model", "bogus", "--out", "{T}/i"]),
    ("import-wrong-model", ["import", "{S}/w.pth", "--model", "resnet32", "--out", "{T}/i"]),
    ("import-malicious-pickle", ["import", "{S}/evil.pth", "--model", "resnet20", "--out", "{T}/i"]),
    ("import-out-user-folder", ["import", "{S}/w.pth", "--model", "resnet20", "--out", "{S}/user"]),
    ("import-out-user-folder-overwrite", ["import", "{S}/w.pth", "--model", "resnet20", "--out", "{S}/user",
                                          "--overwrite"]),
    ("import-mean-wrong-count", ["import", "{S}/w.pth", "--model", "resnet20", "--mean", "1,2", "--out", "{T}/i"]),
    ("import-unknown-format", ["import", "{S}/w.pth", "--model", "resnet20", "--format", "keras", "--out", "{T}/i"]),
    # --- export ---
    ("export-unknown-model", ["export", "--model", "bogus", "--format", "onnx", "--out", "{T}/m.onnx"]),
    ("export-unknown-format", ["export", "--model", "resnet20", "--format", "bogus"]),
    ("export-over-user-file", ["export", "--model", "resnet20", "--format", "safetensors", "--out", "{S}/notes.txt"]),
    ("export-out-is-a-folder", ["export", "--model", "resnet20", "--format", "safetensors", "--out", "{S}/empty"]),
    ("export-missing-run", ["export", "--checkpoint", "{S}/missing", "--format", "onnx"]),
    ("export-zero-batch", ["export", "--model", "resnet20", "--format", "onnx", "--batch", "0", "--out", "{T}/m.onnx"]),
    ("export-zero-input", ["export", "--model", "resnet20", "--format", "onnx", "--input", "3x0x32",
                           "--out", "{T}/m.onnx"]),
    ("export-unknown-setting", ["export", "--model", "resnet20", "--format", "onnx", "-a", "bogus=1",
                                "--out", "{T}/m.onnx"]),
    # --- info, list ---
    ("info-unknown-model", ["info", "bogus"]),
    ("info-input-too-small", ["info", "densenet121", "--input", "3x16x16"]),
    ("info-unknown-setting", ["info", "resnet20", "-a", "bogus=1"]),
    ("info-zero-classes", ["info", "resnet20", "--num-classes", "0"]),
    ("list-unknown-flag", ["list", "--bogus"]),
    # --- bench ---
    ("bench-unknown", ["bench", "bogus"]),
    ("bench-zero-threads", ["bench", "peak", "--quick", "--threads", "0", "--out", "{T}/b"]),
    ("bench-out-user-folder", ["bench", "peak", "--quick", "--out", "{S}/user"]),
    ("bench-no-cuda", ["bench", "peak", "--quick", "--device", "cuda", "--out", "{T}/b"])
    if not torch.cuda.is_available() else ("bench-bad-precision", ["bench", "peak", "--precision", "fp64"]),
    # --- no command, unknown command ---
    ("no-command", []),
    ("unknown-command", ["bogus"]),
]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels and which holds no pixel data:
    what a decoder sees first of a huge image, without the disk or memory to make one."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _make_fixtures(root: Path) -> Path:
    """The shared inputs the cases point at; returns the trained run."""
    (root / "notes.txt").write_text("my notes\n")
    (root / "empty").mkdir()
    user = root / "user"
    (user / "sub").mkdir(parents=True)
    for name in ("notes.txt", "config.json", "metrics.csv", "sub/f"):
        (user / name).write_text("the user's own file\n")
    one = root / "oneclass" / "shoes"
    one.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(one / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / "ok.png")
    for cls in ("a", "b"):
        folder = root / "hugeimages" / cls
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(folder / f"{i}.png")
    (root / "hugeimages" / "a" / "huge.png").write_bytes(_png_header(20000, 20000))
    (root / "huge20000.png").write_bytes(_png_header(20000, 20000))
    (root / "huge12000.png").write_bytes(_png_header(12000, 12000))
    # A nested YAML alias "bomb" inside model_kwargs: 9 levels of 9 aliases, 9**9 leaves expanded.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (root / "bomb.yaml").write_text("model_kwargs:\n" + "".join(f"  {line}\n" for line in levels))
    (root / "deep.json").write_text('{"model_kwargs": ' + '{"a": ' * 200 + "1" + "}" * 200 + "}")
    (root / "big.yaml").write_text("# padding\n" * 200_000 + "lr: 0.1\n")
    (root / "list.yaml").write_text("- lr\n- 0.1\n")
    (root / "bad.yaml").write_text("lr: [0.1\n")
    (root / "unknown.json").write_text('{"learning_rate": 0.1}')
    torch.save(create_model("resnet20").state_dict(), root / "w.pth")
    with open(root / "evil.pth", "wb") as f:
        pickle.dump(_Evil(), f)
    run = root / "run"
    train(TrainConfig(model="cifar_resnet", model_kwargs={"depth": 8}, data="synthetic", epochs=1, batch_size=32,
                      train_subset=64, eval_batch_size=64, precision="fp32", progress=False, tensorboard=False,
                      out=str(run)))
    return run


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


SUBPROCESS_EVERY = 10
# A server process that imports torch and the command line once; each case forks from it.
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["torch", "resdense.cli"])


def _forked_case(argv: list[str], scratch: str, env: dict[str, str], stderr_path: str) -> None:
    """One case in a forked child: the case's environment, folder and stderr, then ``resdense ARGV``,
    exiting as ``python -m resdense`` would (an uncaught exception: its traceback and status 1)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(scratch)
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(1)
    from resdense.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter would print for an uncaught error
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _run_forked(argv: list[str], scratch: Path, env: dict[str, str], stderr_path: Path) -> tuple[Optional[int], str]:
    proc = _FORKS.Process(target=_forked_case, args=(argv, str(scratch), env, str(stderr_path)))
    proc.start()
    proc.join(120)
    if proc.is_alive():  # a wrong command that runs on instead of refusing
        proc.kill()
        proc.join()
        return None, "still running after 120 s"
    return proc.exitcode, stderr_path.read_text() if stderr_path.exists() else ""


def _run_subprocess(argv: list[str], scratch: Path, env: dict[str, str]) -> tuple[Optional[int], str]:
    try:
        proc = subprocess.run([sys.executable, "-m", "resdense", *argv], cwd=scratch, env=env, capture_output=True,
                              text=True, timeout=120)
        return proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:  # a wrong command that runs on instead of refusing
        return None, f"still running after {e.timeout} s"


def _run(case: tuple[str, list[str]], shared: Path, run: Path, scratch_root: Path) -> dict:
    name, template = case
    scratch = scratch_root / name
    scratch.mkdir()
    argv = [a.replace("{S}", str(shared)).replace("{T}", str(scratch)).replace("{RUN}", str(run)) for a in template]
    # matplotlib's own font cache is kept out of the scratch folder: it is not resdense's to write.
    env = {**os.environ, "PYTHONPATH": SRC, "MPLCONFIGDIR": str(scratch_root.parent / "matplotlib"), "HOME": str(scratch), "XDG_CACHE_HOME": str(scratch / ".cache"),
           "TMPDIR": str(scratch), "RESDENSE_DATA": str(shared / "no-data-here"), "OMP_NUM_THREADS": "1"}
    env.pop("CI", None)
    if [c[0] for c in CASES].index(name) % SUBPROCESS_EVERY == 0:
        code, stderr = _run_subprocess(argv, scratch, env)
    else:
        code, stderr = _run_forked(argv, scratch, env, scratch_root.parent / f"stderr-{name}.txt")
    # resdense's dataset cache (statistics of the data, documented in the README) may be filled by
    # a command refused after reading the data; it holds nothing of the mistake and nothing of the user's.
    left = sorted(rel for rel in (str(p.relative_to(scratch)) for p in scratch.rglob("*"))
                  if rel != ".cache" and not rel.startswith(".cache/resdense"))
    return {"argv": argv, "code": code, "stderr": stderr, "left": left}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared")
    run = _make_fixtures(shared)
    before = _snapshot(shared)
    scratch_root = tmp_path_factory.mktemp("scratch")
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        results = dict(zip((c[0] for c in CASES), pool.map(functools.partial(_run, shared=shared, run=run, scratch_root=scratch_root), CASES)))
    return {"results": results, "shared_before": before, "shared_after": _snapshot(shared)}


def test_the_table_is_large_and_names_are_unique():
    names = [c[0] for c in CASES]
    assert len(names) >= 80 and len(set(names)) == len(names)
    commands = {argv[0] for _, argv in CASES if argv and not argv[0].startswith("-")}
    assert {"train", "eval", "predict", "study", "report", "analyze", "import", "export", "info", "list",
            "bench"} <= commands


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_a_wrong_command_says_one_line_exits_2_and_leaves_nothing(outcomes, name):
    got = outcomes["results"][name]
    lines = got["stderr"].strip().splitlines()
    assert got["code"] == 2, f"{got['argv']}: exit {got['code']}\n{got['stderr']}"
    assert "Traceback" not in got["stderr"], got["stderr"]
    assert len(lines) == 1 and lines[0].startswith("resdense"), got["stderr"]
    assert got["left"] == [], f"{got['argv']} left {got['left']}"


def test_no_case_touched_the_shared_files(outcomes):
    before, after = outcomes["shared_before"], outcomes["shared_after"]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], f"new or changed in the shared fixtures: {changed}"
    assert not Path("pwned").exists()
