"""Training: config resolution, schedules, the tensor loader, checkpoints, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from resdense.data.loader import Augment, TensorLoader
from resdense.errors import CheckpointError, ConfigError, UserError
from resdense.train import checkpoint as ckpt
from resdense.train.config import TrainConfig, apply_overrides, load_config_file, validate
from resdense.train.engine import NonFiniteLossError
from resdense.train.recipes import RECIPES
from resdense.train.runner import train
from resdense.train.schedule import Schedule, make_schedule, train_image_size


def tiny_cfg(out: Path, **overrides) -> TrainConfig:
    """A run that takes a second or two: a depth-8 ResNet on synthetic data."""
    base = dict(model="cifar_resnet", model_kwargs={"depth": 8}, data="synthetic", epochs=3, batch_size=64,
                lr=0.05, schedule="cosine", warmup=0.1, progress=False, out=str(out), train_subset=512,
                eval_batch_size=256, precision="fp32")
    base.update(overrides)
    return apply_overrides(TrainConfig(), base, "test")


# --- config -----------------------------------------------------------------------------------

def test_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match="unknown setting.*bogus"):
        apply_overrides(TrainConfig(), {"bogus": 1}, "test")
    with pytest.raises(ConfigError, match="batch_size must be int"):
        apply_overrides(TrainConfig(), {"batch_size": "big"}, "test")
    with pytest.raises(ConfigError, match="lr must be float"):
        apply_overrides(TrainConfig(), {"lr": True}, "test")
    assert apply_overrides(TrainConfig(), {"lr": 1}, "test").lr == 1.0  # int -> float is lossless


@pytest.mark.parametrize("field, value, match", [("lr", -0.1, "--lr"), ("lr", 0.0, "--lr"), ("batch_size", 0, "--batch-size"),
                                                 ("epochs", 0, "--epochs"), ("momentum", 1.5, "momentum")])
def test_validate_refuses_bad_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(TrainConfig(epochs=1), {field: value}, "test"))


def test_config_precedence_recipe_file_flags(tmp_path):
    from resdense.cli import build_parser
    from resdense.cli.train import config_from_args

    (tmp_path / "c.yaml").write_text("recipe: densenet-cifar-paper\nlr: 0.05\nbatch_size: 32\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--batch-size", "16", "--out", "x"])
    cfg, _ = config_from_args(args)
    assert cfg.recipe == "densenet-cifar-paper" and cfg.nesterov is True and cfg.epochs == 300  # recipe
    assert cfg.lr == 0.05                                                                       # file over recipe
    assert cfg.batch_size == 16                                                                 # flag over file
    (tmp_path / "c.json").write_text(json.dumps({"label_smoothing": 0.2}))
    assert load_config_file(tmp_path / "c.json") == {"label_smoothing": 0.2}
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")


def test_recipes_are_valid_configs():
    for name, values in RECIPES.items():
        validate(apply_overrides(TrainConfig(), values, name))
    paper = apply_overrides(TrainConfig(), RECIPES["resnet-cifar-paper"], "r")
    assert (paper.batch_size, paper.iterations, paper.milestones, paper.weight_decay) == (128, 64000, [32000, 48000], 1e-4)


# --- schedules --------------------------------------------------------------------------------

def test_step_schedule_is_the_papers():
    cfg = apply_overrides(TrainConfig(), RECIPES["resnet-cifar-paper"], "r")
    s = make_schedule(cfg, 64000)
    assert [s(0), s(31999), s(32000), s(47999), s(48000), s(63999)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    dense = make_schedule(apply_overrides(TrainConfig(), RECIPES["densenet-cifar-paper"], "d"), 1000)
    assert dense.milestones == (500, 750)


def test_cosine_and_onecycle_schedules():
    cos = Schedule("cosine", 1.0, 100, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    one = Schedule("onecycle", 2.0, 100, warmup_steps=20)
    assert one(19) == pytest.approx(2.0) and one(60) == pytest.approx(1.0)
    assert [cos(i) for i in range(100)] == [cos(i) for i in range(100)]  # a pure function of the step


def test_progressive_resizing_is_a_ramp_of_the_epoch():
    sizes = [train_image_size(e, 8, (28, 28), min_scale=0.57, ramp=0.75, step=4) for e in range(8)]
    # the quick recipe on Fashion-MNIST: a ramp over round(0.75 * 8) = 6 epochs in steps of 4 pixels
    assert [h for h, _ in sizes] == [16, 16, 20, 20, 24, 24, 28, 28] and all(h == w for h, w in sizes)
    assert train_image_size(5, 8, (28, 28), min_scale=0.5, ramp=0.5) == (28, 28)  # after the ramp: full size
    assert train_image_size(0, 8, (28, 28)) == (28, 28)  # min_scale 1: off
    assert train_image_size(0, 4, (30, 50), min_scale=0.5, step=4) == (16, 24)  # each side on its own, nearest
    assert train_image_size(0, 2, (6, 6), min_scale=0.1, step=4) == (4, 4)  # never below one step
    assert train_image_size(0, 2, (3, 3), min_scale=0.1, step=4) == (3, 3)  # nor above the image


# --- loader -----------------------------------------------------------------------------------

def _images(n=200, c=1, h=8, w=8):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), \
        torch.arange(200) % 10


def test_loader_shapes_normalisation_and_length():
    x, y = _images()
    loader = TensorLoader(x, y, 64, mean=(0.5,), std=(0.25,), channels_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and batches[-1][0].shape == (8, 1, 8, 8)
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and xb.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(xb, (x[:64].float() / 255 - 0.5) / 0.25, atol=1e-6) and torch.equal(yb, y[:64])  # fp32 rounding
    assert len(TensorLoader(x, y, 64, drop_last=True)) == 3


def test_loader_resizes_per_epoch_for_progressive_resizing():
    x, y = _images()
    loader = TensorLoader(x, y, 64, shuffle=True, augment=Augment(1, 0.5), mean=(0.5,), std=(0.25,), seed=1)
    loader.set_epoch(2)
    full = next(iter(loader))[0]
    loader.set_epoch(2, (8, 8))  # the stored size: no resizing at all
    assert torch.equal(next(iter(loader))[0], full)
    loader.set_epoch(2, (4, 6))
    small, labels = next(iter(loader))
    assert small.shape == (64, 1, 4, 6) and small.is_contiguous(memory_format=torch.channels_last)
    # the same images and augmentation, only smaller: an antialiased resize of the full-size batch
    expected = torch.nn.functional.interpolate(full, size=(4, 6), mode="bilinear", antialias=True)
    assert torch.allclose(small, expected, atol=1e-5) and labels.shape == (64,)


def test_loader_is_deterministic_per_seed_and_epoch():
    x, y = _images()

    def epoch_batches(seed, epoch):
        loader = TensorLoader(x, y, 50, shuffle=True, augment=Augment(2, 0.5), seed=seed)
        loader.set_epoch(epoch)
        return [b for b in loader]

    a, b, c = epoch_batches(0, 1), epoch_batches(0, 1), epoch_batches(0, 2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    # A shuffled epoch visits every image exactly once.
    assert sorted(torch.cat([yb for _, yb in a]).tolist()) == sorted(y.tolist())


def test_augmentation_statistics():
    n = 4000
    x = torch.arange(16, dtype=torch.uint8).repeat(n, 1, 16, 1) + 1  # column j holds j+1 everywhere
    gen = torch.Generator().manual_seed(0)
    flipped = Augment(pad=0, flip=0.5).apply(x, gen)
    rate = (flipped[:, 0, 0, 0] == 16).float().mean().item()
    assert 0.47 < rate < 0.53
    cropped = Augment(pad=2, flip=0.0).apply(x, gen)
    shift = cropped[:, 0, 8, 8].long() - 9  # the horizontal offset of each crop, in -2..2
    assert set(shift.unique().tolist()) == {-2, -1, 0, 1, 2}
    counts = torch.bincount(shift + 2, minlength=5).float() / n
    assert (counts - 0.2).abs().max() < 0.03
    # Padded regions are zeros (black), never wrapped-around pixels.
    left = cropped[shift == -2]
    assert (left[:, 0, 8, :2] == 0).all() and (left[:, 0, 8, 2] == 1).all()  # row 8: inside vertically


def test_loader_shards_are_slices_of_the_single_process_batch():
    x, y = _images()
    single = list(TensorLoader(x, y, 40, shuffle=True, augment=Augment(2, 0.5), seed=3, drop_last=True))
    shards = [list(TensorLoader(x, y, 40, shuffle=True, augment=Augment(2, 0.5), seed=3, drop_last=True,
                                rank=r, world_size=2)) for r in range(2)]
    for i, (xb, yb) in enumerate(single):
        assert torch.equal(torch.cat([shards[0][i][0], shards[1][i][0]]), xb)
        assert torch.equal(torch.cat([shards[0][i][1], shards[1][i][1]]), yb)


# --- runs, checkpoints, resume ----------------------------------------------------------------

def test_training_run_writes_everything(tmp_path):
    reads = []
    summary = train(tiny_cfg(tmp_path / "run"), epoch_callback=lambda ctx, row: reads.append(ctx.splits.test_reads))
    run = tmp_path / "run"
    assert reads == [0, 0, 0]  # the test set is not read during training
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "summary.json", "last/model.safetensors",
                 "last/state.pt", "last/meta.json", "best/meta.json"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr")
    assert 0 <= summary["test_error_last"] <= 1 and "test_error_best" in summary
    state = torch.load(run / "last" / "state.pt", weights_only=True)  # no pickled code needed
    assert state["epoch"] == 3 and state["config"]["model"] == "cifar_resnet"
    assert json.loads((run / "last" / "meta.json").read_text())["config"]["seed"] == 0
    assert len(list((run / "checkpoints").iterdir())) <= 2  # only last and best are kept


@pytest.mark.parametrize("min_scale", [1.0, 0.5])  # 0.5: progressive resizing, a function of the epoch
def test_resume_continues_exactly(tmp_path, min_scale):
    run_cfg = dict(epochs=4, min_scale=min_scale, resize_ramp=0.5)
    full = train(tiny_cfg(tmp_path / "full", **run_cfg))

    class Crash(Exception):
        pass

    def crash_after_two(ctx, row):
        if row["epoch"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train(tiny_cfg(tmp_path / "cut", **run_cfg), epoch_callback=crash_after_two)
    resumed = train(tiny_cfg(tmp_path / "cut", **run_cfg), resume=True)
    a = ckpt.read_weights(tmp_path / "full" / "last")
    b = ckpt.read_weights(tmp_path / "cut" / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lrs = [[json.loads(line)["lr"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "cut")]
    assert lrs[0] == lrs[1]
    assert full["test_error_last"] == resumed["test_error_last"]
    sizes = [json.loads(line)["train_size"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    side = int(sizes[-1].split("x")[0])
    assert sizes[-2:] == [f"{side}x{side}"] * 2 and (sizes[0] == sizes[-1]) == (min_scale == 1.0)


def test_existing_run_dir_is_refused_without_resume_or_overwrite(tmp_path):
    train(tiny_cfg(tmp_path / "run", epochs=1))
    before = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--resume .* --overwrite"):
        train(tiny_cfg(tmp_path / "run", epochs=1))
    assert (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == before  # nothing lost
    train(tiny_cfg(tmp_path / "run", epochs=1, seed=1), overwrite=True)


def test_resume_refuses_another_model(tmp_path):
    train(tiny_cfg(tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="trained with model='cifar_resnet'"):
        train(tiny_cfg(tmp_path / "run", epochs=2, model="cifar_plain"), resume=True,
              flag_overrides={"model": "cifar_plain", "epochs": 2})


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    train(tiny_cfg(tmp_path / "run", epochs=1))
    good = ckpt.read_weights((tmp_path / "run" / "last").resolve())

    def exploding_save(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt.torch, "save", exploding_save)
    with pytest.raises(OSError, match="injected"):
        train(tiny_cfg(tmp_path / "run", epochs=2), resume=True, flag_overrides={"epochs": 2})
    monkeypatch.undo()
    last = (tmp_path / "run" / "last").resolve()
    assert last.name == "epoch-0001"
    again = ckpt.read_weights(last)
    assert all(torch.equal(good[k], again[k]) for k in good)
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_checkpoint_errors(tmp_path):
    train(tiny_cfg(tmp_path / "run", epochs=1))
    last = (tmp_path / "run" / "last").resolve()
    model, meta = ckpt.load_for_inference(tmp_path / "run")
    assert meta["model"] == "cifar_resnet" and not model.training
    other = __import__("resdense").create_model("resnet20")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        ckpt.load_weights(other, ckpt.read_weights(last))
    # DDP / torch.compile prefixes are tolerated.
    prefixed = {f"module._orig_mod.{k}": v for k, v in ckpt.read_weights(last).items()}
    ckpt.load_weights(model, prefixed)
    # Pickled code in the state file is refused, not run.

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (last / "state.pt").write_bytes(pickle.dumps({"x": Evil()}))
    torch.save({"x": Evil()}, last / "state.pt")
    with pytest.raises(CheckpointError, match="pickled code"):
        ckpt.read_state(last)
    (last / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.read_weights(last)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "nowhere")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from resdense.train import engine

    real = engine.F.cross_entropy
    calls = {"n": 0}

    def nan_after_a_while(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["n"] > 10 else loss  # 8 steps per epoch: NaN in epoch 2

    monkeypatch.setattr(engine.F, "cross_entropy", nan_after_a_while)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train(tiny_cfg(tmp_path / "run", epochs=3))
    assert (tmp_path / "run" / "last").resolve().name == "epoch-0001"


def test_error_triggered_warmup_holds_the_lr(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", epochs=2, schedule="step", warmup=0.0, warmup_lr=0.001,
                   warmup_until_error=0.0, warmup_min_depth=1)  # never below 0%: warm-up holds throughout
    train(cfg)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [0.001, 0.001]


def test_resume_accepts_the_same_settings_and_refuses_changed_ones(tmp_path):
    from resdense.train.runner import resolve_resume_config

    cfg = tiny_cfg(tmp_path / "run", epochs=1)
    train(cfg)
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["model_kwargs"]["depth"] == 8 and "num_classes" in saved["model_kwargs"]  # filled in by the run
    # the first command's flags again (-a depth=8 ...), plus what may change: the run's config comes back
    same = resolve_resume_config(cfg, run, {"model_kwargs": {"depth": 8}, "lr": 0.05, "epochs": 3, "threads": 1})
    assert same.model_kwargs == saved["model_kwargs"] and same.epochs == 3
    for changed, name in [({"model_kwargs": {"depth": 14}}, "model_kwargs"), ({"lr": 0.1}, "lr"),
                          ({"model_kwargs": {"drop_rate": 0.1}}, "model_kwargs")]:
        with pytest.raises(ConfigError, match=f"--resume keeps the run's settings.*{name}"):
            resolve_resume_config(cfg, run, changed)


# --- the final model's training error (the papers' "training error") ---------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_mode_training_error_equals_a_hand_computation(tmp_path, precision):
    """summary's train_error_eval: the final weights, eval mode, the run's seeded training subset,
    no augmentation, computed here by hand. Both precision paths are forced (never what the
    machine picks); bf16 runs on a tiny model so an emulating CPU stays fast."""
    from resdense.data import load_dataset
    from resdense.train.checkpoint import load_for_inference

    cfg = tiny_cfg(tmp_path / "run", epochs=2, train_subset=128, batch_size=32, eval_train=True, seed=3,
                   precision=precision, test_subset=100, threads=1)
    summary = train(cfg)
    splits = load_dataset("synthetic", None, val_size=cfg.val_size, split_seed=0)
    pick = torch.randperm(len(splits.train.images), generator=torch.Generator().manual_seed(3))[:128]
    images, labels = splits.train.images[pick], splits.train.labels[pick]
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    x = (images.float() / 255 - mean) / std
    model, _ = load_for_inference(tmp_path / "run", prefer="last")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x).float()
    by_hand = (logits.argmax(1) != labels).float().mean().item()
    if precision == "fp32":
        assert summary["train_error_eval"] == pytest.approx(by_hand, abs=1e-9)
    else:  # bf16 rounding may flip a near-tie or two between two equally valid computations
        assert abs(summary["train_error_eval"] - by_hand) <= 2 / 128
    assert 0 <= summary["train_error_eval"] <= 1 and summary["train_loss_eval"] > 0
    assert summary["test_images"] == 100
    # the running error of the last epoch is kept beside it, under its own name
    assert summary["final_train_error"] == json.loads((tmp_path / "run" / "metrics.jsonl").read_text()
                                                      .splitlines()[-1])["train_error"]
