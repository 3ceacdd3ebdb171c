"""`resdense list` and `resdense info`, and one-line errors with exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from resdense.cli import main
from resdense.models import list_models, model_description, model_entry
from resdense.models._registry import plain_text


def test_info_prints_stage_table_and_paper_figures(capsys):
    assert main(["info", "resnet56"]) == 0
    out = capsys.readouterr().out
    assert "layer3" in out and "853,018" in out and "6.97" in out


def test_info_resnet50_names_the_papers_stride_placement(capsys):
    assert main(["info", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert "25,557,032" in out and "4.09G" in out and "stride_in_1x1=True: 3.86 G" in out


def test_info_with_input_and_builder_args(capsys):
    assert main(["info", "cifar_resnet", "-a", "depth=110", "--input", "1x28x28", "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "1x28x28" in out and "64x7x7" in out


def test_info_json(capsys):
    import json

    assert main(["info", "densenet_bc100_k12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 769_162


def test_list(capsys):
    assert main(["list", "plain*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("plain18") and any(line.startswith("plain1202") for line in out)


def test_every_model_is_described_in_one_plain_sentence(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_models()
    for name, line in zip(list_models(), lines):
        sentence = line[len(name):].strip()
        assert sentence == model_description(name)
        assert len(sentence) > 20 and sentence[0].isupper() and sentence.endswith("."), line
        assert sentence.count(". ") == 0 and not re.search(r"`|:\w+:|\*\*", sentence), line


def test_a_model_without_a_docstring_is_described_from_its_entry():
    assert plain_text("Plain twin of :func:`~resdense.models.cifar_resnet` (``bc=True``).\n\nMore.") == \
        "Plain twin of cifar_resnet (bc=True)."
    entry = model_entry("resnet56")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(entry.fn, "__doc__", None)
        assert model_description("resnet56") == "A resnet network for 3x32x32 inputs as in He et al. 2015."


@pytest.mark.parametrize("argv, message", [
    (["info", "resnt56"], "did you mean resnet56"),
    (["info", "cifar_resnet", "-a", "depth=21"], "6n+2"),
    (["info", "densenet121", "--input", "3x16x16"], "at least 32x32"),
    (["info", "resnet56", "--input", "3x0"], "3x32x32"),
    (["info", "resnet56", "-a", "bogus=1"], "bogus"),
    (["info", "resnet56", "--num-classes", "0"], "num_classes"),
    (["list", "nothing*"], "no model matches"),
    (["info", "resnet56", "--bogus"], "unrecognized arguments"),
])
def test_user_mistakes_get_one_line_and_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "resdense", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command, arg, message", [
    ("train", "bogus=3", "cifar_resnet has no setting 'bogus'; its settings are: act_layer, block_kwargs"),
    ("train", "block_kwargs={'bogus': 1}", "block_kwargs of BasicBlock has no setting 'bogus'; its settings are: drop_rate"),
    ("info", "block_kwargs={'bogus': 1}", "block_kwargs of BasicBlock has no setting 'bogus'"),
    ("export", "bogus=3", "cifar_resnet has no setting 'bogus'"),
])
def test_a_model_setting_it_does_not_take_is_one_line_not_a_type_error(command, arg, message, tmp_path):
    out = tmp_path / "out"
    argv = {"train": ["train", "--model", "cifar_resnet", "-a", arg, "--data", "synthetic", "--epochs", "1",
                      "--out", str(out)],
            "info": ["info", "cifar_resnet", "-a", arg],
            "export": ["export", "--model", "cifar_resnet", "-a", arg, "--format", "safetensors", "--out", str(out)]}
    proc = subprocess.run([sys.executable, "-m", "resdense", *argv[command]], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "TypeError" not in proc.stderr
    assert not out.exists()  # refused before anything was written
