"""Weights from elsewhere (`resdense import`), fine-tuning on an image folder (`train --init-from`),
short runs that learn, and TensorBoard events."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resdense
from resdense.cli import main
from resdense.models.importers import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, mismatch_report,
                                       rename_keys)
from resdense.train.checkpoint import load_for_inference

FMNIST = Path("/usr/share/datasets/fashion-mnist")
SRC = str(Path(__file__).resolve().parents[1] / "src")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
SMALL = ["--threads", "1", "--precision", "fp32", "--no-progress"]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "resdense", *argv], capture_output=True, text=True, timeout=120,
                          env=env)


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics, so equal outputs mean the buffers were carried over too."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_torchvision_state_dict_imports_with_equal_outputs(name, tmp_path, capsys):
    torch.manual_seed(0)
    source = _randomise_bn(resdense.create_model(name))
    path = tmp_path / f"{name}.pth"
    torch.save(source.state_dict(), path)  # as torchvision saves (and publishes) its weights
    run = tmp_path / "run"
    assert main(["import", str(path), "--model", name, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "torchvision" in out
    # A bare state dict says nothing of its normalisation: the one assumed is said, with the fix.
    assert (f"{path} does not say how its inputs were normalised: assumed ImageNet's (mean 0.485,0.456,0.406, "
            "std 0.229,0.224,0.225); if the weights were trained with another, import again with --mean M,M,M "
            "--std S,S,S --overwrite") in out.splitlines()
    model, meta = load_for_inference(run)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # small: DenseNet-121 is slow on CPU
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["input_size"] == [3, 224, 224]
    assert len(meta["classes"]) == 1000 and meta["model_kwargs"]["num_classes"] == 1000
    assert meta["imported"]["format"] == "torchvision" and (run / "best" / "model.safetensors").is_file()


def _cifar_repository_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """The layout of the public CIFAR ResNet repositories: DataParallel's `module.` prefix, the
    classifier called `linear`, a {"state_dict": ...} wrapper with training bookkeeping."""
    sd = {"module." + (f"linear.{k[3:]}" if k.startswith("fc.") else k): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "best_prec1": 91.73, "epoch": 200}, path)


@pytest.fixture(scope="module")
def cifar_import(tmp_path_factory):
    """A CIFAR-repository ResNet-20 checkpoint and its import."""
    tmp = tmp_path_factory.mktemp("cifar")
    torch.manual_seed(0)
    source = _randomise_bn(resdense.create_model("resnet20"))
    path = tmp / "resnet20-12fca82f.th"
    _cifar_repository_checkpoint(source, path)
    run = tmp / "imported"
    assert main(["import", str(path), "--model", "resnet20", "--out", str(run)]) == 0
    return source, path, run


def test_cifar_repository_checkpoint_imports_with_equal_outputs(cifar_import):
    source, _, run = cifar_import
    model, meta = load_for_inference(run)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    assert meta["imported"]["format"] == "cifar" and meta["imported"]["wrapper"] == "state_dict"
    assert meta["classes"] == list(CIFAR10_CLASSES) and meta["mean"] == list(CIFAR10_MEAN)
    assert meta["data"] == "cifar10" and meta["input_size"] == [3, 32, 32]


def test_shapes_give_num_classes_and_in_chans_and_classes_are_stored(tmp_path, capsys):
    source = resdense.create_model("resnet20", num_classes=3, in_chans=1)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    run = tmp_path / "run"
    assert main(["import", str(path), "--model", "resnet20", "--out", str(run), "--classes", "cat,dog,fox",
                 "--mean", "0.5", "--std", "0.25", "--input-size", "28"]) == 0
    assert "assumed" not in capsys.readouterr().out  # given, not assumed
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["model_kwargs"]["num_classes"] == 3 and meta["model_kwargs"]["in_chans"] == 1
    assert meta["imported"]["normalisation"] == "given"
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["std"] == [0.25] and meta["input_size"] == [1, 28, 28]


def test_timm_safetensors_with_compile_prefix_imports(tmp_path):
    from safetensors.torch import save_file

    source = _randomise_bn(resdense.create_model("resnet20", num_classes=4))
    path = tmp_path / "model.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(path))
    run = tmp_path / "run"
    assert main(["import", str(path), "--model", "resnet20", "--format", "timm", "--out", str(run)]) == 0
    model, meta = load_for_inference(run)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    assert meta["classes"] == ["0", "1", "2", "3"] and meta["mean"] == list(IMAGENET_MEAN)


MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _save_with_normalisation(where: str, state: dict, folder: Path) -> tuple[Path, str]:
    """``state`` saved as a source that stores its normalisation ``where``; the file and how the
    import names the place."""
    from safetensors.torch import save_file

    if where == "wrapper":  # a training script's checkpoint dictionary
        torch.save({"state_dict": state, "normalization": {"mean": MEAN, "std": STD}}, folder / "w.pth")
        return folder / "w.pth", "the checkpoint's 'normalization' entry"
    if where == "buffers":  # RobustBench-style models normalise inside: mu and sigma buffers
        torch.save({"mu": torch.tensor(MEAN).view(1, 3, 1, 1), "sigma": torch.tensor(STD).view(1, 3, 1, 1),
                    **state}, folder / "w.pth")
        return folder / "w.pth", "its buffers mu/sigma"
    tensors = {k: v.contiguous() for k, v in state.items()}
    if where == "header":
        save_file(tensors, str(folder / "w.safetensors"), metadata={"mean": json.dumps(MEAN), "std": json.dumps(STD)})
        return folder / "w.safetensors", "its safetensors header"
    save_file(tensors, str(folder / "model.safetensors"))  # a Hugging Face timm repository
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet", "num_classes": 10, "pretrained_cfg": {
        "input_size": [3, 32, 32], "mean": MEAN, "std": STD}}))
    return folder / "model.safetensors", "config.json's 'pretrained_cfg' entry"


@pytest.mark.parametrize("where", ["wrapper", "buffers", "header", "config.json"])
def test_import_reads_the_normalisation_where_the_source_stores_it(where, tmp_path, capsys, one_thread):
    source = _randomise_bn(resdense.create_model("cifar_resnet", depth=8))
    path, named = _save_with_normalisation(where, source.state_dict(), tmp_path)
    run = tmp_path / "run"
    assert main(["import", str(path), "--model", "cifar_resnet", "-a", "depth=8", "--out", str(run)]) == 0
    assert "assumed" not in capsys.readouterr().out
    model, meta = load_for_inference(run)
    assert meta["mean"] == MEAN and meta["std"] == STD and meta["imported"]["normalisation"].endswith(named)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_pickled_code_is_refused_in_one_line(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": resdense.create_model("resnet20").state_dict(), "hook": Payload()}, path)
    proc = _cli("import", str(path), "--model", "resnet20", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "payload ran" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pickled code" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_every_mismatched_key_is_listed_grouped(tmp_path, capsys):
    path = tmp_path / "resnet56.pth"
    torch.save(resdense.create_model("resnet56").state_dict(), path)
    assert main(["import", str(path), "--model", "resnet20", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unexpected 216: layer1.{3-8}.*, layer2.{3-8}.*, layer3.{3-8}.*" in err
    # Shapes and missing keys are listed one by one where they do not fold into whole modules.
    own = resdense.create_model("resnet20").state_dict()
    state = dict(own)
    state["layer2.0.conv1.weight"] = torch.zeros(32, 8, 3, 3)
    del state["layer3.2.bn2.running_var"]
    report = mismatch_report(own, state)
    assert "missing 1: layer3.2.bn2.running_var" in report
    assert "layer2.0.conv1.weight (file 32x8x3x3, model 32x16x3x3)" in report


def test_old_torchvision_densenet_names_are_renamed():
    renamed = rename_keys({"module.features.denseblock1.denselayer1.norm.1.weight": torch.ones(1),
                           "features.denseblock2.denselayer12.conv.2.weight": torch.ones(1)},
                          resdense.models.importers.LAYOUTS["torchvision"])
    assert set(renamed) == {"features.denseblock1.denselayer1.norm1.weight",
                            "features.denseblock2.denselayer12.conv2.weight"}


# --- the Python API --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _probabilities(predictions):
    return [[p for _, p in top] for top in predictions]


def test_load_an_import_and_predict_on_tensors_pil_images_and_paths(cifar_import, tmp_path, one_thread):
    source, _, run = cifar_import
    model = resdense.load(run)
    assert isinstance(model, resdense.TrainedModel) and not model.training
    assert model.classes == list(CIFAR10_CLASSES) and model.input_size == (3, 32, 32)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    x = (pixels.float() / 255 - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = source(x).softmax(1).topk(3)
    top = model.predict(pixels)
    assert [[c for c, _ in row] for row in top] == [[CIFAR10_CLASSES[i] for i in row] for row in expected.indices.tolist()]
    assert _probabilities(top) == [pytest.approx(row, abs=1e-5) for row in expected.values.tolist()]
    png = tmp_path / "x.png"
    Image.fromarray(pixels[0].permute(1, 2, 0).numpy()).save(png)
    assert model.predict(png) == model.predict(Image.open(png)) == model.predict([str(png)])
    for same in (png, pixels[0], pixels[:1].float() / 255):  # a file, one (C, H, W) tensor, a 0..1 float batch
        assert _probabilities(model.predict(same)) == [pytest.approx(_probabilities(top)[0], abs=1e-5)]
    with pytest.raises(resdense.UserError, match="cannot read an image from a dict"):
        model.predict({"not": "an image"})


def test_create_model_pretrained_loads_the_weights_or_says_in_one_line_why_not(cifar_import):
    source, path, run = cifar_import
    net = resdense.create_model("resnet20", pretrained=run)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), source.state_dict().values()))
    assert net.pretrained_cfg["classes"] == list(CIFAR10_CLASSES) and net.pretrained_cfg["input_size"] == [3, 32, 32]
    refusals = [(dict(name="resnet56", pretrained=run), resdense.CheckpointError, "holds resnet20 weights, not resnet56"),
                (dict(name="resnet20", pretrained=run, num_classes=5), resdense.CheckpointError, "does not fit"),
                (dict(name="resnet20", pretrained=True), resdense.ConfigError, "resdense ships no weights"),
                (dict(name="resnet20", pretrained=path), resdense.CheckpointError, "resdense import")]
    for kwargs, error, message in refusals:
        with pytest.raises(error, match=message) as caught:
            resdense.create_model(**kwargs)
        assert "\n" not in str(caught.value)


def test_torch_hub_entries_are_the_registry_and_load_from_a_clone(cifar_import):
    import importlib.util

    _, _, run = cifar_import
    spec = importlib.util.spec_from_file_location("resdense_hubconf", REPO / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    entries = sorted(n for n in dir(hub) if not n.startswith("_") and callable(getattr(hub, n)))
    assert entries == sorted(resdense.list_models()) and hub.dependencies == ["torch"]
    assert str(REPO / "src") in sys.path  # a clone's src/, for a checkout that is not installed
    assert hub.resnet56.__doc__.startswith(resdense.model_description("resnet56"))
    net = torch.hub.load(str(REPO), "resnet20", source="local", pretrained=str(run))
    assert torch.equal(net.fc.weight, resdense.create_model("resnet20", pretrained=run).fc.weight)
    assert torch.hub.load(str(REPO), "plain56", source="local", num_classes=3).num_classes == 3


def test_train_and_run_study_take_settings_and_raise_user_errors(tmp_path):
    from resdense.api import train_config
    from resdense.train.config import TrainConfig

    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: resnet32\nlr: 0.2\n")
    assert train_config({"model": "resnet32"}, lr=0.3).lr == 0.3
    assert train_config(config_file, epochs=2).model == "resnet32" and train_config(config_file).lr == 0.2
    assert train_config(TrainConfig(model="plain20"), seed=3).seed == 3
    assert train_config(recipe="finetune").recipe == "finetune"
    mistakes = [(lambda: resdense.train(data="synthetic"), "out=RUN_DIR"),
                (lambda: resdense.train(bogus=1, out=str(tmp_path / "r")), "unknown setting"),
                (lambda: resdense.train(model="resnt20", data="synthetic", out=str(tmp_path / "r")), "did you mean"),
                (lambda: resdense.run_study("nope", out=tmp_path / "s"), "unknown study"),
                (lambda: resdense.run_study("degradation", out=tmp_path / "s", options={"bogus": 1}), "no option bogus")]
    for call, message in mistakes:
        with pytest.raises(resdense.UserError, match=message):
            call()
    assert list(tmp_path.iterdir()) == [config_file]  # refused before anything was written


def _readme_python() -> list[str]:
    section = (REPO / "README.md").read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@needs_fmnist
def test_the_readme_python_section_runs(tmp_path, monkeypatch, one_thread):
    images, _ = _fashion_mnist(1)  # the first test image of each class, in class order
    Image.fromarray(images[7]).save(tmp_path / "shoe.png")  # a sneaker
    monkeypatch.chdir(tmp_path)
    blocks = _readme_python()
    assert len(blocks) == 1
    names: dict = {}
    exec(compile(blocks[0], str(REPO / "README.md"), "exec"), names)
    run, model, net, study = names["run"], names["model"], names["net"], names["study"]
    assert isinstance(run, resdense.TrainResult) and 0 <= run.test_error <= 1 and run.run_dir.is_dir()
    assert not model.training and model.input_size == (1, 28, 28) and model.classes[7] == "Sneaker"
    assert len(model.predict("shoe.png", top_k=2)[0]) == 2 and net.pretrained_cfg["classes"] == model.classes
    assert isinstance(study, resdense.StudyResult) and study.complete and study.verdicts
    import resdense.train.runner as runner  # resdense.train is the package as well as the call

    assert callable(resdense.train) and resdense.train.runner is runner


# --- fine-tuning on a folder of real images --------------------------------------------------


def _fashion_mnist(n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    from resdense.data.idx import read_idx_pair

    images, labels = read_idx_pair(FMNIST / "t10k-images-idx3-ubyte.gz", FMNIST / "t10k-labels-idx1-ubyte.gz")
    images, labels = images[:, 0].numpy(), labels.numpy()
    pick = np.concatenate([np.flatnonzero(labels == c)[:n_per_class] for c in range(10)])
    return images[pick], labels[pick]


CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Real Fashion-MNIST PNGs as a user would have them: mostly 28x28 greyscale, some larger RGB,
    RGBA and palette images, and one file that is not an image at all."""
    root = tmp_path_factory.mktemp("folder") / "clothes"
    images, labels = _fashion_mnist(20)
    for i, (img, label) in enumerate(zip(images, labels)):
        d = root / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img)
        kind = i % 7
        if kind == 1:
            im = im.convert("RGB").resize((36, 36))
        elif kind == 2:
            im = im.convert("RGBA")
        elif kind == 3:
            im = im.convert("P")
        im.save(d / f"{i:04d}.png")
    (root / "bag" / "broken.png").write_bytes(b"this is not a PNG file")
    return root


@pytest.fixture(scope="module")
def finetuned(image_folder, cifar_import, tmp_path_factory):
    _, _, imported = cifar_import
    run = tmp_path_factory.mktemp("ft") / "run"
    proc = _cli("train", "--init-from", str(imported), "--data", str(image_folder), "--bad-images", "skip",
                "--recipe", "finetune", "--epochs", "2", "--batch-size", "32", "--record-gradients",
                "--out", str(run), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


@needs_fmnist
def test_finetune_on_an_image_folder_trains_evaluates_and_predicts(finetuned, image_folder, tmp_path, capsys):
    run, proc = finetuned
    assert "initialised from" in proc.stdout and "new classifier for the data's 10 classes" in proc.stdout
    assert "broken.png" in proc.stderr  # skipped with a warning naming it
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["model"] == "resnet20" and meta["classes"] == sorted(CLASSES)  # the folder order (sorted names), saved
    assert meta["input_size"] == [3, 28, 28]  # RGB images present: 3 channels; most common size
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)
    assert summary["test_images"] > 0

    assert main(["eval", "--checkpoint", str(run)]) == 0
    report = json.loads((run / "eval_test.json").read_text())
    assert report["n"] == summary["test_images"] and report["classes"] == sorted(CLASSES)

    img = tmp_path / "query.png"
    Image.open(next((image_folder / "trouser").glob("*.png"))).convert("LA").resize((50, 50)).save(img)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--json", "--top-k", "3", str(img)]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert len(top) == 3 and all(p["class"] in CLASSES for p in top)


@needs_fmnist
def test_tensorboard_events_read_back(finetuned):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = finetuned
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/error", "val/loss", "val/error", "lr", "images_per_s", "train_image_size",
            "gradients/first_layer", "gradients/last_layer"} <= tags
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in history]
    assert [e.value for e in losses] == pytest.approx([r["train_loss"] for r in history], rel=1e-6)
    assert [e.value for e in acc.Scalars("train_image_size")] == [28.0, 28.0]
    assert len(acc.Scalars("gradients/first_layer")) == 3  # at initialisation and after each epoch
    assert "gradients/norms" in acc.Tags()["histograms"]


@needs_fmnist
def test_resumed_finetune_continues_from_its_own_checkpoint(finetuned, cifar_import, image_folder, tmp_path, capsys):
    run, _ = finetuned
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    _, _, imported = cifar_import
    moved = imported.with_name("imported-moved")
    imported.rename(moved)  # the init weights are gone: a resume must not need them
    try:
        code = main(["train", "--init-from", str(imported), "--data", str(image_folder), "--bad-images", "skip",
                     "--recipe", "finetune", "--epochs", "3", "--batch-size", "32", "--record-gradients",
                     "--out", str(copy), "--resume", *SMALL])
    finally:
        moved.rename(imported)
    out = capsys.readouterr().out
    assert code == 0 and "resuming" in out and "initialised from" not in out
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 3


def test_an_imported_run_is_not_resumed_as_training(cifar_import, capsys):
    _, _, imported = cifar_import
    assert main(["train", "--data", "synthetic", "--out", str(imported), "--resume", *SMALL]) == 2
    assert "--init-from" in capsys.readouterr().err


@needs_fmnist
def test_bad_image_without_skip_names_the_flag(image_folder, tmp_path, capsys):
    assert main(["train", "--data", str(image_folder), "--epochs", "1", "--out", str(tmp_path / "r"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "--bad-images skip" in err


# --- a first run on a small slice learns ------------------------------------------------------


@needs_fmnist
def test_short_default_run_lowers_the_loss(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "fashion-mnist", "--train-subset", "1024", "--val-size", "500", "--epochs", "2",
                 "--set", "test_subset=500", "--set", "eval_batch_size=500", "--out", str(run), *SMALL]) == 0
    assert "short run (16 steps" in capsys.readouterr().out  # the adaptation said what it changed
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # A fresh 10-class net starts at ln 10; the quick recipe unadapted ended above it.
    assert history[-1]["val_loss"] < math.log(10) and history[-1]["train_loss"] < history[0]["train_loss"]
    assert json.loads((run / "summary.json").read_text())["test_error_last"] < 0.8  # chance: 0.9


def test_short_run_adaptation_leaves_long_runs_alone():
    from resdense.train.config import TrainConfig
    from resdense.train.recipes import SHORT_RUN_DEFAULTS, recipe
    from resdense.train.schedule import make_schedule, short_run_min_scale, short_run_total

    cfg = TrainConfig(**{**recipe("quick"), **SHORT_RUN_DEFAULTS})
    full = make_schedule(cfg, 8 * 429)  # the published quick run: 55k images, batch 128, 8 epochs
    assert (full.base_lr, full.warmup_steps, full.note) == (0.2, round(0.15 * 8 * 429), "")
    assert short_run_total(cfg, 429, 8 * 429) == 8 * 429
    short = make_schedule(cfg, 63)
    assert short.warmup_steps == 21 and short.base_lr == pytest.approx(0.2 * math.sqrt(63 / 1000))
    assert short_run_total(cfg, 21, 8 * 21) == 15 * 21  # the recipe's 8 epochs extended to >= 300 steps
    assert short_run_min_scale(cfg, 8 * 429) == 0.57 and short_run_min_scale(cfg, 63) == 1.0
    assert make_schedule(TrainConfig(**recipe("quick")), 63).base_lr == 0.2  # library callers: the recipe as is


@pytest.mark.parametrize("argv, short_run_steps, min_steps", [
    ([], 1000, 300),                              # everything left to the quick recipe: adapted
    (["--epochs", "3"], 1000, 0),                 # an explicit length is kept
    (["--lr", "0.1"], 0, 300),                    # an explicit lr is kept exactly
    (["--recipe", "finetune", "--epochs", "3"], 0, 0),  # the fine-tuning recipe's lr is not scaled
])
def test_the_command_line_adapts_only_what_the_user_left_to_the_recipe(argv, short_run_steps, min_steps):
    from resdense.cli import build_parser
    from resdense.cli.train import config_from_args

    cfg, _ = config_from_args(build_parser().parse_args(["train", "--out", "x", *argv]))
    assert (cfg.short_run_steps, cfg.min_steps) == (short_run_steps, min_steps)


def test_tensorboard_is_silent_when_missing_unless_asked(monkeypatch, tmp_path, capsys):
    from resdense.train import tensorboard

    monkeypatch.setattr(tensorboard, "available", lambda: False)
    tiny = ["--model", "cifar_resnet", "-a", "depth=8", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
            "--train-subset", "256", "--set", "eval_batch_size=256", *SMALL]
    assert main(["train", *tiny, "--tensorboard", "--out", str(tmp_path / "asked")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'resdense[tensorboard]'" in err and not (tmp_path / "asked").exists()
    assert main(["train", *tiny, "--out", str(tmp_path / "quiet")]) == 0
    captured = capsys.readouterr()
    assert "tensorboard" not in (captured.out + captured.err).replace(str(tmp_path), "RUN").lower()
    assert not (tmp_path / "quiet" / "tensorboard").exists()


def test_init_from_a_bare_file_needs_the_model_name(tmp_path, capsys):
    path = tmp_path / "w.pth"
    torch.save(resdense.create_model("resnet20").state_dict(), path)
    assert main(["train", "--init-from", str(path), "--data", "synthetic", "--out", str(tmp_path / "r"), *SMALL]) == 2
    assert "--model" in capsys.readouterr().err
