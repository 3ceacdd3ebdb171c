"""The training run's pieces: the engine's typed settings and results, the saved shape of a
mid-epoch position, a context that leaves its config alone, and a command line generated from
TrainConfig."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from resdense.models import create_model
from resdense.train.config import TrainConfig, apply_overrides
from resdense.train.engine import CurveInterval, EpochProgress, EpochSettings, EpochStats, TrainState, train_one_epoch
from resdense.train.state import EpochPosition, RunState

# A mid-epoch position exactly as resdense 0.2 wrote it into state.pt (interval: a positional list).
OLD_POSITION = {"epoch": 1, "batch": 3, "epoch_seed": 12345,
                "progress": {"batch": 3, "loss_sum": 401.5, "wrong": 170, "seen": 192, "train_time": 1.25,
                             "interval": [120.25, 51, 64]},
                "epoch_time": 1.5, "wall_time": 9.75}


def test_an_old_mid_epoch_position_reads_into_named_fields_and_saves_in_its_old_shape():
    position = EpochPosition.from_dict(copy.deepcopy(OLD_POSITION))
    assert position.progress.interval == CurveInterval(loss_sum=120.25, wrong=51, seen=64)
    assert position.progress.batch == 3 and position.epoch_seed == 12345
    assert position.to_dict() == OLD_POSITION


def test_a_run_state_from_an_old_state_file_continues_on_the_saved_clock():
    saved = {"step": 11, "epoch": 1, "warmup_done": True, "best_val_error": 0.5, "curve": [{"step": 10}],
             "metrics": [{"epoch": 1, "wall_time": 4.0}], "position": copy.deepcopy(OLD_POSITION)}
    state = RunState.from_saved(saved, wall_start=0.0)
    assert (state.step, state.epoch, state.best_val, state.wall_offset) == (11, 1, 0.5, 9.75)
    assert state.position is not None and state.position.batch == 3 and state.curve == [{"step": 10}]
    del saved["position"]
    assert RunState.from_saved(saved, wall_start=0.0).wall_offset == 4.0


def _batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _one_epoch(**kwargs) -> tuple[EpochStats, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("cifar_resnet", depth=8, in_chans=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stats = train_one_epoch(model, _batches(), opt, lambda step: 0.1, TrainState(), **kwargs)
    return stats, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_train_one_epoch_takes_typed_settings_or_their_fields_and_returns_typed_stats():
    cpu = torch.device("cpu")
    typed, weights = _one_epoch(settings=EpochSettings(cpu, label_smoothing=0.1), curve=[])
    keywords, same = _one_epoch(device=cpu, label_smoothing=0.1, curve=[])
    assert torch.equal(weights, same)
    assert isinstance(typed, EpochStats) and typed.steps == 3 and not typed.stopped
    assert typed.train_loss == keywords.train_loss and typed.progress.batch == 3 and typed.progress.seen == 24
    with pytest.raises(TypeError, match="not both"):
        _one_epoch(settings=EpochSettings(cpu), device=cpu)


def test_an_epoch_trained_in_pieces_ends_where_the_whole_one_does():
    cpu = torch.device("cpu")
    whole, whole_weights = _one_epoch(device=cpu, curve_every=2, curve=[])
    torch.manual_seed(0)
    model = create_model("cifar_resnet", depth=8, in_chans=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state, curve, batches = TrainState(), [], _batches()
    settings = EpochSettings(cpu, curve_every=2)
    first = train_one_epoch(model, batches, opt, lambda step: 0.1, state, settings, curve=curve,
                            should_stop=lambda: True)
    assert first.stopped and first.progress.batch == 1 and first.progress.interval.seen == 8
    rest = train_one_epoch(model, batches[1:], opt, lambda step: 0.1, state, settings, curve=curve,
                           progress=EpochProgress.from_dict(first.progress.to_dict()))
    assert torch.equal(whole_weights, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert rest.progress.batch == 3 and rest.train_loss == pytest.approx(whole.train_loss, rel=1e-12)


def test_build_context_leaves_the_callers_config_as_it_was(tmp_path):
    from resdense.train.context import build_context

    cfg = apply_overrides(TrainConfig(), dict(model="cifar_resnet", model_kwargs={"depth": 8}, data="synthetic",
                                              epochs=1, batch_size=64, train_subset=128, progress=False,
                                              precision="fp32", out=str(tmp_path / "run")), "test")
    before = copy.deepcopy(cfg)
    ctx = build_context(cfg)
    assert cfg == before and cfg.model_kwargs == {"depth": 8}
    assert ctx.cfg is not cfg and ctx.cfg.model_kwargs["num_classes"] == 10 and ctx.cfg.model_kwargs["depth"] == 8


# --- one source for every setting: TrainConfig's fields make `resdense train`'s flags -----------

def _train_parser():
    from resdense.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices["train"]


def test_every_setting_has_help_and_is_a_flag_or_listed_as_set_only():
    from resdense.train.config import FIELDS, flag_of, help_of

    _, train = _train_parser()
    dests = {a.dest: a for a in train._actions}
    epilog = train.epilog.splitlines()
    for name in FIELDS:
        assert help_of(name).strip(), f"{name} has no help line"
        if flag_of(name) is not None:
            assert name in dests and dests[name].help, f"{name} has a flag spec but no flag"
        else:
            assert any(line.split()[:1] == [name] and help_of(name) in line for line in epilog), \
                f"{name} is neither a flag nor listed under --set in --help"


# A value for each flag, and what the config holds after it.
_SAMPLES = {"model_kwargs": (["-a", "depth=8"], {"depth": 8}), "recipe": (["--recipe", "finetune"], "finetune"),
            "epochs": (["--epochs", "3"], 3), "iterations": (["--iterations", "7"], 7)}


def _sample(name, flag, kind):
    from resdense.cli.train import _flag_names

    if name in _SAMPLES:
        return _SAMPLES[name]
    option = _flag_names(name, flag)[0]
    if kind is bool:
        return [option], flag.switch != "off"
    if flag.choices:
        return [option, flag.choices[-1]], flag.choices[-1]
    return {int: ([option, "3"], 3), float: ([option, "0.5"], 0.5)}.get(kind, ([option, "x1"], "x1"))


def test_every_flag_reaches_its_setting():
    from resdense.cli.train import config_from_args
    from resdense.train.config import FIELDS, flag_of, value_type

    parser, _ = _train_parser()
    for name in FIELDS:
        flag = flag_of(name)
        if flag is None or name == "out":
            continue
        argv, expected = _sample(name, flag, value_type(name))
        cfg, flags = config_from_args(parser.parse_args(["train", "--out", "x", *argv]))
        assert getattr(cfg, name) == expected and name in flags, f"{' '.join(argv)} did not set {name}"
    cfg, _ = config_from_args(parser.parse_args(["train", "--out", "somewhere"]))
    assert cfg.out == "somewhere"


# --- the Trainer: one run's state apart from its machinery ---------------------------------------

def _tiny(out, seed):
    return apply_overrides(TrainConfig(), dict(model="cifar_resnet", model_kwargs={"depth": 8}, data="synthetic",
                                               epochs=2, batch_size=64, train_subset=256, eval_batch_size=256,
                                               progress=False, precision="fp32", threads=1, seed=seed,
                                               tensorboard=False, out=str(out)), "test")


def test_two_trainers_stepped_in_turn_in_one_process_end_as_two_separate_runs(tmp_path):
    from resdense.train import checkpoint as ckpt
    from resdense.train.context import build_context
    from resdense.train.rundir import prepare_run_dir
    from resdense.train.runner import EpochResult, Trainer, train

    for seed in (0, 1):
        train(_tiny(tmp_path / f"alone{seed}", seed))
    trainers, locks = [], []
    for seed in (0, 1):  # both built before either trains: each run's state is its own
        run_dir, lock = prepare_run_dir(_tiny(tmp_path / f"turns{seed}", seed), resume=False, overwrite=False)
        locks.append(lock)
        trainers.append(Trainer(build_context(_tiny(run_dir, seed)), run_dir))
        trainers[-1].restore(resume=False)
    try:
        while any(t.training for t in trainers):
            for trainer in trainers:
                epoch = trainer.run_epoch()
                assert isinstance(epoch, EpochResult) and epoch.diverged is None and epoch.stats is not None
                trainer.end_epoch(epoch)
        for trainer in trainers:
            trainer.finish()
    finally:
        for lock in locks:
            lock.release()
    for seed in (0, 1):
        alone, turns = (ckpt.read_weights(tmp_path / f"{kind}{seed}" / "last") for kind in ("alone", "turns"))
        assert all(torch.equal(alone[k], turns[k]) for k in alone)
