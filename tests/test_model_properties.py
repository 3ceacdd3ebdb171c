"""Property tests: random valid configurations build, run and count consistently; invalid ones
raise the documented ConfigError."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import resdense
from resdense.errors import ConfigError

FAST = settings(max_examples=15, deadline=None)


@FAST
@given(n=st.integers(1, 3), shortcut=st.sampled_from(["A", "B", "C", "none"]), bottleneck=st.booleans(),
       preact=st.booleans(), in_chans=st.integers(1, 4), num_classes=st.integers(1, 12), size=st.integers(4, 24))
def test_random_cifar_resnets(n, shortcut, bottleneck, preact, in_chans, num_classes, size):
    depth = (9 if bottleneck else 6) * n + 2
    name = "cifar_preact_resnet" if preact else "cifar_resnet"
    model = resdense.create_model(name, depth=depth, bottleneck=bottleneck, shortcut=shortcut,
                                  in_chans=in_chans, num_classes=num_classes)
    out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    # Weighted layers on the main path: stem + blocks x convs-per-block + fc = depth.
    main_path = [n_ for n_, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "downsample" not in n_]
    assert len(main_path) + 1 == depth


@FAST
@given(depth=st.integers(5, 40), bc=st.booleans(), growth=st.integers(1, 8), memory_efficient=st.booleans())
def test_random_cifar_densenets(depth, bc, growth, memory_efficient):
    per_layer = 6 if bc else 3
    kwargs = dict(depth=depth, growth_rate=growth, bc=bc, memory_efficient=memory_efficient)
    if (depth - 4) % per_layer or depth < 4 + per_layer:
        try:
            resdense.create_model("cifar_densenet", **kwargs)
        except ConfigError as e:
            assert "(L-4)" in str(e)
            return
        raise AssertionError(f"depth {depth} (bc={bc}) should have been refused")
    model = resdense.create_model("cifar_densenet", **kwargs)
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    n = (depth - 4) // per_layer
    assert model.num_features == _expected_channels(n, growth, bc)


def _expected_channels(n: int, k: int, bc: bool) -> int:
    chs = 2 * k if bc else 16
    for block in range(3):
        chs += n * k
        if block < 2 and bc:
            chs //= 2
    return chs


@FAST
@given(depth=st.integers(-3, 60))
def test_resnet_depth_rule(depth):
    valid = depth >= 8 and (depth - 2) % 6 == 0
    try:
        model = resdense.create_model("cifar_resnet", depth=depth)
    except ConfigError as e:
        assert not valid and "6n+2" in str(e)
    else:
        assert valid and len(model.layer1) == (depth - 2) // 6
