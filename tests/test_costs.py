"""Cost model: the paper's exact counts, the published tables, the Flax model's own parameter
count, XLA's compiled cost analysis, and the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from manifold_lab.cli import run_main
from manifold_lab.costs import abstract_param_count, memory_table, model_costs, slim_table, table2_rows
from manifold_lab.costs.__main__ import main
from manifold_lab.costs.analytic import input_taps
from manifold_lab.costs.published import SLIM_CHECKPOINTS, TABLE2
from manifold_lab.models import MobileNetV1Config, MobileNetV2Config, build_model
from manifold_lab.models.geometry import pad_amounts


def test_paper_counts_width_1_224():
    costs = model_costs(MobileNetV2Config(), 224)
    assert costs.params == 3_504_872
    assert costs.bn_statistics == 34_112
    assert costs.madds == 300_774_272
    assert costs.conv_madds == 299_494_272
    assert costs.classifier_madds == 1_280_000
    assert sum(layer.madds for layer in costs.layers) == costs.madds
    assert costs.layers[-2].output_shape == (7, 7, 1280)


@pytest.mark.parametrize("width, params", [(0.35, 1_677_128), (0.5, 1_968_680), (0.75, 2_636_424),
                                           (1.3, 5_386_792), (1.4, 6_108_776)])
def test_params_per_width(width, params):
    assert model_costs(MobileNetV2Config(width=width), 224).params == params


def test_width_1_4_stem_and_head():
    costs = model_costs(MobileNetV2Config(width=1.4), 224)
    assert costs.layers[0].output_shape == (112, 112, 48)
    assert costs.layers[-2].output_shape[2] == 1792  # last conv scales above width 1


def test_mobilenet_v1_counts():
    costs = model_costs(MobileNetV1Config(), 224)
    assert costs.madds == 568_740_352  # the V1 paper's 569M
    assert round(costs.params / 1e6, 1) == 4.2


def test_slim_table_every_row_exact():
    rows = slim_table()
    assert len(rows) == 22 == len(SLIM_CHECKPOINTS)
    for row in rows:
        assert row["macs_millions"] == row["published_macs_millions"], row
        assert row["params_millions"] == row["published_params_millions"], row


def test_memory_table_max_rows_and_flags():
    table = memory_table()
    v1, v2 = table["mobilenet_v1"], table["mobilenet_v2"]
    assert (v1["max"]["resolution"], v1["max"]["channels"]) == (112, 64)
    assert v1["max"]["kilobytes"] == pytest.approx(1605.632) and v1["max"]["match"]
    assert (v2["max"]["resolution"], v2["max"]["channels"]) == (112, 16)
    assert v2["max"]["kilobytes"] == pytest.approx(401.408) and v2["max"]["match"]
    v1_rows = {r["resolution"]: r for r in v1["rows"]}
    v2_rows = {r["resolution"]: r for r in v2["rows"]}
    assert [r for r, row in v1_rows.items() if row["match"]] == [112, 56, 28, 14, 1]
    # the printed cells that break resolution^2 x channels x 2 bytes
    assert [r for r, row in v1_rows.items() if row["follows_formula"] is False] == [7]
    assert [r for r, row in v2_rows.items() if row["follows_formula"] is False] == [7]
    assert [r for r, row in v2_rows.items() if row["published_channels_exist"] is False] == [56, 28, 14]
    # the stem output (32 ch at 112) is inside the first bottleneck: not materialised
    assert v2_rows[112]["channels"] == 16 and v2_rows[1]["channels"] == 1280


def test_table2_decoded_equals_printed():
    rows = table2_rows(MobileNetV2Config(), 224)
    assert len(rows) == len(TABLE2)
    assert all(row["match"] for row in rows)
    assert sum(row["n"] for row in rows if row["operator"] == "bottleneck") == 17
    assert sum(spec.bottleneck_shortcut for spec in MobileNetV2Config().blocks()) == 10


@pytest.mark.parametrize("residual", ["expansion", "none"])
def test_residual_switch_same_costs(residual):
    base, other = MobileNetV2Config(width=0.5), MobileNetV2Config(width=0.5, residual=residual)
    assert model_costs(other, 160).as_dict() == model_costs(base, 160).as_dict()
    assert abstract_param_count(other) == abstract_param_count(base)


@pytest.mark.parametrize("config", [
    MobileNetV2Config(), MobileNetV2Config(width=0.35), MobileNetV2Config(width=1.4),
    MobileNetV2Config(width=0.5, layout="small", num_classes=10, in_channels=1),
    MobileNetV1Config(), MobileNetV1Config(width=0.25), MobileNetV1Config(width=0.75, num_classes=10),
], ids=lambda c: f"{type(c).__name__}-{c.width}-{c.layout}")
def test_flax_model_counts_equal_analytic(config):
    counted = abstract_param_count(config)
    costs = model_costs(config, 224)
    assert counted == {"params": costs.params, "bn_statistics": costs.bn_statistics}


@pytest.mark.parametrize("size, stride, padding", [(8, 1, "same"), (8, 2, "same"), (7, 2, "same"),
                                                   (9, 2, "symmetric"), (4, 1, "symmetric")])
def test_input_taps_counts_real_pixels(size, stride, padding):
    low, high = pad_amounts(size, 3, stride, padding)
    padded = [0] * low + [1] * size + [0] * high
    out = (size + low + high - 3) // stride + 1
    assert input_taps(size, 3, stride, padding) == sum(
        padded[o * stride + k] for o in range(out) for k in range(3))


def _convs_only(costs, padding):
    """Every counted layer of ``costs`` as a bare XLA convolution/dot, all in one program."""
    def run(xs, ws):
        outs = []
        for layer, x, w in zip(costs.layers, xs, ws):
            if layer.kind == "dense":
                outs.append(x @ w)
                continue
            pads = [pad_amounts(n, layer.kernel, layer.stride, padding) for n in x.shape[1:3]]
            groups = x.shape[-1] if layer.kind == "depthwise" else 1
            outs.append(jax.lax.conv_general_dilated(
                x, w, (layer.stride,) * 2, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=groups))
        return outs
    xs, ws = [], []
    for layer in costs.layers:
        h, w, c = layer.input_shape
        k, out = layer.kernel, layer.output_shape[2]
        if layer.kind == "dense":
            xs.append(jax.ShapeDtypeStruct((1, c), jnp.float32))
            ws.append(jax.ShapeDtypeStruct((c, out), jnp.float32))
        else:
            xs.append(jax.ShapeDtypeStruct((1, h, w, c), jnp.float32))
            ws.append(jax.ShapeDtypeStruct((k, k, 1 if layer.kind == "depthwise" else c, out),
                                           jnp.float32))
    return jax.jit(run).lower(xs, ws).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("config, resolution", [
    (MobileNetV2Config(width=0.35), 32),
    (MobileNetV2Config(width=1.0, padding="symmetric"), 33),
    (MobileNetV1Config(width=0.5), 40),
], ids=["v2-0.35-32", "v2-1.0-33-symmetric", "v1-0.5-40"])
def test_xla_counts_every_layer_exactly(config, resolution):
    """XLA counts 2 flops per multiply-add over real input taps only: padded taps are skipped."""
    costs = model_costs(config, resolution)
    assert costs.madds_unpadded < costs.madds
    assert _convs_only(costs, config.padding) == 2 * costs.madds_unpadded


@pytest.mark.parametrize("config, resolution", [
    (MobileNetV2Config(width=0.35, depthwise_impl="xla"), 32),
    (MobileNetV1Config(width=0.5, depthwise_impl="xla"), 32),
], ids=["v2", "v1"])
def test_xla_counts_whole_model(config, resolution):
    """The whole eval-mode network: XLA's flops / 2 are the unpadded multiply-adds plus the
    elementwise work (BatchNorm, activations, adds, pooling), at most 3 per conv output."""
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))  # shapes only
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, resolution, resolution, config.in_channels), jnp.float32)
    flops = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False)).lower(
        state, x).compile().cost_analysis()["flops"]
    costs = model_costs(config, resolution)
    outputs = sum(h * w * c for h, w, c in (layer.output_shape for layer in costs.layers))
    excess = flops / 2 - costs.madds_unpadded
    assert outputs <= excess <= 3 * outputs
    assert flops / 2 == pytest.approx(costs.madds, rel=0.05)


def _cli(argv, capsys):
    code = run_main(main, argv, prog="costs")
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json(capsys):
    code, out, _ = _cli(["--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert (data["params"], data["params_model"], data["madds"], data["bn_statistics"]) == (
        3_504_872, 3_504_872, 300_774_272, 34_112)
    assert len(data["layers"]) == 2 + 17 * 2 + 16 + 1


def test_cli_text_and_v1(capsys):
    code, out, _ = _cli(["--model", "mobilenet_v1", "--width", "0.5", "--resolution", "128",
                         "--classes", "10", "--layout", "small"], capsys)
    assert code == 0
    assert "layer13/pointwise" in out and "multiply-adds" in out


@pytest.mark.parametrize("table", ["slim", "memory", "table2"])
def test_cli_tables(table, capsys):
    code, out, _ = _cli(["--table", table], capsys)
    assert code == 0
    expected = {"slim": "22/22 rows reproduced exactly", "memory": "1600",
                "table2": "1 x 1 x 1280  conv2d 1x1"}[table]
    assert expected in out and "DIFFERS" not in out
    code, out, _ = _cli(["--table", table, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["table"] == table
    if table == "slim":
        assert all(row["match"] for row in data["rows"])
    if table == "memory":
        assert data["mobilenet_v1"]["max"]["published_kilobytes"] == 1600
        assert data["mobilenet_v2"]["max"]["published_kilobytes"] == 400


@pytest.mark.parametrize("argv", [["--width", "0"], ["--width", "x"], ["--resolution", "0"],
                                  ["--model", "resnet"], ["--table", "nope"], ["--layout", "big"],
                                  ["--table", "table2", "--model", "mobilenet_v1"], ["--bogus"]])
def test_cli_bad_flags_exit_2(argv, capsys):
    code, out, err = _cli(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("costs: error:")


def test_bounds_table_is_table_3_at_any_batch_and_width(capsys: pytest.CaptureFixture[str]) -> None:
    """``--table bounds``: Table 3's 400K (112 x 112 x 16 at 2 bytes) per image, scaled by the batch
    and the bytes per value; the pair bound adds the block's input (224 x 224 x 3)."""
    assert main(["--table", "bounds", "--bytes-per-value", "2", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["largest_bytes"] == 112 * 112 * 16 * 2 == 401_408 and one["largest_tensor"] == "block00/output"
    assert one["pair_bytes"] == (224 * 224 * 3 + 112 * 112 * 16) * 2
    assert main(["--table", "bounds", "--batch", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["largest_bytes"] == 401_408 * 2 * 32
    assert run_main(main, ["--table", "bounds", "--model", "mobilenet_v1"]) == 2
