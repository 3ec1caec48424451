"""Published numbers the cost model is checked against, kept as data in one place.

Sources: the MobileNetV2 paper (arXiv 1801.04381 v4) Tables 2-4, and the authors' checkpoint
table in ``tensorflow/models/research/slim/nets/mobilenet/README.md`` (MACs in millions, truncated
to integers; parameters in millions to two decimals, counted without BatchNorm, 1001 classes).
"""

from __future__ import annotations

#: Authors' checkpoint table: (width, resolution) -> (MACs in millions, params in millions).
SLIM_CHECKPOINTS: dict[tuple[float, int], tuple[int, float]] = {
    (1.4, 224): (582, 6.06),
    (1.3, 224): (509, 5.34),
    (1.0, 224): (300, 3.47),
    (1.0, 192): (221, 3.47),
    (1.0, 160): (154, 3.47),
    (1.0, 128): (99, 3.47),
    (1.0, 96): (56, 3.47),
    (0.75, 224): (209, 2.61),
    (0.75, 192): (153, 2.61),
    (0.75, 160): (107, 2.61),
    (0.75, 128): (69, 2.61),
    (0.75, 96): (39, 2.61),
    (0.5, 224): (97, 1.95),
    (0.5, 192): (71, 1.95),
    (0.5, 160): (50, 1.95),
    (0.5, 128): (32, 1.95),
    (0.5, 96): (18, 1.95),
    (0.35, 224): (59, 1.66),
    (0.35, 192): (43, 1.66),
    (0.35, 160): (30, 1.66),
    (0.35, 128): (20, 1.66),
    (0.35, 96): (11, 1.66),
}
SLIM_NUM_CLASSES = 1001

#: Table 3: spatial resolution -> (max channels, memory in Kb), 16-bit activations.
#: MobileNetV2 assumes the Section 5 evaluation (tensors inside a bottleneck are not materialised).
TABLE3_MOBILENET_V1: dict[int, tuple[int, int]] = {
    112: (64, 1600), 56: (128, 800), 28: (256, 400), 14: (512, 200), 7: (1024, 199), 1: (1024, 2),
}
TABLE3_MOBILENET_V2: dict[int, tuple[int, int]] = {
    112: (16, 400), 56: (32, 200), 28: (64, 100), 14: (160, 62), 7: (320, 32), 1: (1280, 2),
}
TABLE3_MAX_KB = {"mobilenet_v1": 1600, "mobilenet_v2": 400, "shufflenet_2x_g3": 600}
TABLE3_BYTES_PER_ACTIVATION = 2

#: Table 2 as printed: (input shape, operator, t, c, n, s); ``None`` for the paper's "-".
TABLE2: tuple[tuple[str, str, int | None, int | str | None, int | None, int | None], ...] = (
    ("224^2 x 3", "conv2d", None, 32, 1, 2),
    ("112^2 x 32", "bottleneck", 1, 16, 1, 1),
    ("112^2 x 16", "bottleneck", 6, 24, 2, 2),
    ("56^2 x 24", "bottleneck", 6, 32, 3, 2),
    ("28^2 x 32", "bottleneck", 6, 64, 4, 2),
    ("14^2 x 64", "bottleneck", 6, 96, 3, 1),
    ("14^2 x 96", "bottleneck", 6, 160, 3, 2),
    ("7^2 x 160", "bottleneck", 6, 320, 1, 1),
    ("7^2 x 320", "conv2d 1x1", None, 1280, 1, 1),
    ("7^2 x 1280", "avgpool 7x7", None, None, 1, None),
    ("1 x 1 x 1280", "conv2d 1x1", None, "k", None, None),
)

#: Exact counts for width 1.0, 224 px, 1000 classes (torchvision and Keras agree on params).
V2_REFERENCE = {"params": 3_504_872, "bn_statistics": 34_112, "madds": 300_774_272,
                "conv_madds": 299_494_272, "classifier_madds": 1_280_000}
