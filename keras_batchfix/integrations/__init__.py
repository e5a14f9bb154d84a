"""Integrations: the package's losses inside other training set-ups.

Each module of this subpackage joins keras-batchfix to one framework or model
family (keras-hub detectors and language models, TensorFlow's multi-worker
strategy, torch's `DistributedDataParallel` under Keras's `fit`). Import the
module you need, e.g. `from keras_batchfix.integrations import torch_ddp`;
nothing is imported here.
"""
