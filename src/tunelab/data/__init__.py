"""Data sets, their splits and their loaders.

Every data option is a function built by `hydra.utils.instantiate(cfg.data.dataset, ...)`
(`tunelab.data.digits`, `fake`, `image_folder`, `csv_images`, `cifar10`); the run supplies what
only it knows (the input size the model needs, the model's normalization, the seed). Each returns
`Splits`: train, val and a held-out test split that is the same for every seed and fold.

- `splits`: drawing, caching and rotating the splits (folds), class counts and class weights;
- `tensors`: the small sets held as tensors (digits, fake);
- `files`: the file-backed sets (your own images, CIFAR-10);
- `decoded`: images decoded once into a store of uint8 pixels that runs and jobs share;
- `cached`: file-backed splits read from those pixels and augmented as tensors (`data.cache`);
- `csv_files`: your own images listed in a CSV file (path, label and optionally split);
- `loaders`: seeded, resumable batches (shuffled, balanced or in order);
- `sizes`: the training set's size from a config, without loading it.
"""

from tunelab.data.cached import CACHE_MODES, CachedImages, cached_splits
from tunelab.data.csv_files import csv_images
from tunelab.data.files import cifar10, image_folder
from tunelab.data.loaders import DEVICE_DATA_SHARE, SAMPLERS, EpochSampler, TensorBatches, make_loader, to_device
from tunelab.data.sizes import train_size
from tunelab.data.splits import Splits, cache_dir, class_weights, kfold, labels_of, stratified_split
from tunelab.data.tensors import digits, digits_arrays, fake

__all__ = [
    "CACHE_MODES", "DEVICE_DATA_SHARE", "SAMPLERS", "CachedImages", "cached_splits", "EpochSampler", "Splits", "TensorBatches", "cache_dir", "cifar10", "class_weights",
    "csv_images", "digits", "digits_arrays", "fake", "image_folder", "kfold", "labels_of", "make_loader", "stratified_split",
    "to_device", "train_size",
]
