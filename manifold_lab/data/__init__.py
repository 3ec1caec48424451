"""Datasets and the on-device input pipeline.

``load_dataset(name, data_dir=None, image_size=None) -> (train, test)`` for the names in
:data:`DATASETS`; in-memory splits are :class:`ArrayDataset` (uint8 NHWC on the host), fed to the
model by the jittable functions of :mod:`manifold_lab.data.pipeline` (see its docstring for an
example). ``imagefolder`` splits are :class:`~manifold_lab.data.imagefolder.ImageFolder` streams.
"""

from manifold_lab.data.base import ArrayDataset, channel_stats
from manifold_lab.data.pipeline import (PipelineSpec, augment, batch_indices, device_batches,
                                        epoch_permutation, eval_batch, normalize, num_eval_batches,
                                        pipeline_spec, random_crop, random_flip, steps_per_epoch,
                                        to_device, train_batch)
from manifold_lab.data.registry import DATASETS, load_dataset

__all__ = ["ArrayDataset", "DATASETS", "PipelineSpec", "augment", "batch_indices", "channel_stats",
           "device_batches", "epoch_permutation", "eval_batch", "load_dataset", "normalize",
           "num_eval_batches", "pipeline_spec", "random_crop", "random_flip", "steps_per_epoch",
           "to_device", "train_batch"]
