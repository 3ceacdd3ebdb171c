"""Projected cost of every study's `standard` preset on a 2-core CPU and on one H100.

A projection, not a measurement: each run's images (from the preset's own run settings) over a
per-image training time fitted through two nets measured on each machine, plus evaluation. Rerun it
after changing a preset:  .venv/bin/python scripts/standard_cost.py

Measured rates (training images/s at batch 128 on Fashion-MNIST, 28x28):
- CPU: a 2-core AVX2-only AMD EPYC in fp32, one run on both cores, nothing else running:
  resnet20 638, resnet56 222 (`resdense train --model M --data fashion-mnist --recipe resnet-cifar-paper
  --iterations 100 --precision fp32`, the epoch line's img/s; 40 steps read 460 and 128, their start
  counting for more). On a CPU a step costs about its multiply-adds, so the time per image is fitted
  as a + b * MACs.
- H100 (an earlier round, README "On a GPU"): four paper-preset runs side by side in bf16, each at
  resnet20 5,868 and resnet56 3,510 images/s. A small net's step there is bound by kernel launches,
  which grow with its layers, not its multiply-adds: the time per image is fitted as a + b * layers
  (convolutions and the classifier), and a smaller batch pays the same launches for fewer images.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from torch import nn  # noqa: E402

from resdense.analysis.complexity import profile  # noqa: E402
from resdense.models import create_model  # noqa: E402
from resdense.studies import STUDIES, StudyConfig  # noqa: E402

TRAIN, VAL, TEST = 55_000, 5_000, 10_000       # Fashion-MNIST's split in resdense
SHAPE = (1, 28, 28)
CPU = {"resnet20": 638.0, "resnet56": 222.0}   # images/s, see above
GPU = {"resnet20": 5_868.0, "resnet56": 3_510.0}
GPU_SLOTS, GPU_BATCH = 4, 128                  # the H100 rates were four runs side by side at batch 128
EVAL_COST = 1 / 3                              # a forward pass costs about a third of a training step's image


def _layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def _net(name: str, kwargs: dict) -> tuple[float, int]:
    model = create_model(name, num_classes=10, in_chans=SHAPE[0], **kwargs)
    _, macs, _ = profile(model, SHAPE)
    return float(macs), _layers(model)


def _line(x0: float, y0: float, x1: float, y1: float):
    b = (y1 - y0) / (x1 - x0)
    return y0 - b * x0, b


def main() -> None:
    (m20, l20), (m56, l56) = _net("resnet20", {}), _net("resnet56", {})
    cpu_a, cpu_b = _line(m20, 1 / CPU["resnet20"], m56, 1 / CPU["resnet56"])
    gpu_a, gpu_b = _line(l20, 1 / GPU["resnet20"], l56, 1 / GPU["resnet56"])
    print(f"{'study':<12} {'runs':>4} {'training images':>16} {'2-core CPU (fp32)':>18} {'one H100 (bf16, 4 side by side)':>32}")
    for name, spec in STUDIES.items():
        study = StudyConfig(study=name, preset="standard", options=dict(spec.default_options))
        cpu_s = gpu_s = images = 0.0
        for run in spec.runs(study):
            cfg = run.config
            macs, layers = _net(cfg.model, dict(cfg.model_kwargs))
            trained = cfg.epochs * (TRAIN // cfg.batch_size) * cfg.batch_size
            evaluated = EVAL_COST * (cfg.epochs * VAL + TRAIN + TEST + VAL)
            images += trained
            cpu_s += (trained + evaluated) * (cpu_a + cpu_b * macs)
            gpu_s += (trained * GPU_BATCH / cfg.batch_size + evaluated) * (gpu_a + gpu_b * layers)
        print(f"{name:<12} {len(spec.runs(study)):>4} {images / 1e6:>14.1f} M {cpu_s / 3600:>16.0f} h "
              f"{gpu_s / GPU_SLOTS / 60:>30.0f} min")


if __name__ == "__main__":
    main()
