"""Fine-tuning's batch-norm recalibration (``--recalibrate-bn``): the statistics of weights
trained elsewhere are re-estimated on the new data, and nothing else changes."""

from __future__ import annotations

import torch

from conftest import randomise_bn, run_cli
from resdense import create_model
from resdense.train.finetune import recalibrate_bn


def _batches(n: int = 4, batch: int = 8, size: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    # Data unlike the weights' own (mean 3, std 2): the old statistics are far from these.
    return [(3 + 2 * torch.randn(batch, 1, size, size, generator=g), torch.zeros(batch, dtype=torch.long))
            for _ in range(n)]


def test_recalibration_changes_only_the_batch_norm_statistics_to_the_new_datas():
    torch.manual_seed(0)
    model = randomise_bn(create_model("cifar_resnet", depth=8, in_chans=1, num_classes=3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    batches = _batches()
    assert recalibrate_bn(model, batches) == 32
    after = model.state_dict()
    stats = {k for k in after if k.endswith(("running_mean", "running_var"))}
    assert stats and all(not torch.equal(before[k], after[k]) for k in stats)
    unchanged = set(after) - stats - {k for k in after if k.endswith("num_batches_tracked")}
    assert all(torch.equal(before[k], after[k]) for k in unchanged), "a weight or another buffer moved"
    assert all(p.grad is None for p in model.parameters())
    assert not model.training, "the model's mode is restored"
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta
    # The first norm's running mean is the mean response of the first convolution over all images.
    with torch.no_grad():
        first = model.conv1(torch.cat([x for x, _ in batches]))
    torch.testing.assert_close(model.bn1.running_mean, first.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_train_recalibrates_after_loading_the_init_weights_and_only_with_them(tmp_path):
    common = ["--model", "cifar_resnet", "-a", "depth=8", "--data", "synthetic", "--iterations", "2", "--batch-size", "16",
              "--train-subset", "32", "--val-size", "16", "--set", "test_subset=16", "--set", "eval_train=False",
              "--threads", "1", "--precision", "fp32", "--no-progress", "--no-tensorboard"]
    code, _, err = run_cli(["train", *common, "--out", str(tmp_path / "source")])
    assert code == 0, err
    code, out, err = run_cli(["train", *common, "--init-from", str(tmp_path / "source"), "--recalibrate-bn",
                              "--out", str(tmp_path / "ft")])
    assert code == 0, err
    assert "initialised from" in out and "batch-norm statistics re-estimated on " in out
    code, _, err = run_cli(["train", *common, "--recalibrate-bn", "--out", str(tmp_path / "alone")])
    assert code == 2 and "--recalibrate-bn" in err and "--init-from" in err and "Traceback" not in err
