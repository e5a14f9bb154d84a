"""keras-batchfix: losses whose scale does not depend on how Keras batches them."""

import importlib
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {
    "num_anchors_per_cell": "keras_batchfix.ssd.anchors",
    "ssd_anchors": "keras_batchfix.ssd.anchors",
    "encode_ssd_targets": "keras_batchfix.ssd.box_matching",
    "match_anchors": "keras_batchfix.ssd.box_matching",
    "CenterLoss": "keras_batchfix.center_loss",
    "compensate": "keras_batchfix.normalized_loss",
    "diagnose": "keras_batchfix.diagnostics.loss_check",
    "diagnose_model": "keras_batchfix.diagnostics.model_check",
    "NormalizedLoss": "keras_batchfix.normalized_loss",
    "count_weight": "keras_batchfix.normalized_loss",
    "EMACount": "keras_batchfix.normalizers",
    "GlobalCount": "keras_batchfix.normalizers",
    "LocalCount": "keras_batchfix.normalizers",
    "Normalizer": "keras_batchfix.normalizers",
    "Model": "keras_batchfix.training.model",
    "NormalizerUpdates": "keras_batchfix.training.model",
    "SpikeMonitor": "keras_batchfix.spikes.monitor",
    "SSDMultiboxLoss": "keras_batchfix.ssd.loss",
}

__all__ = [*_API, "__version__"]


def _load_api():
    """Imports the public API (and with it Keras and its backend)."""
    for name, module in _API.items():
        globals()[name] = getattr(importlib.import_module(module), name)


def __getattr__(name):
    if name in _API:
        _load_api()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


def _starting_cli():
    """True while `python -m keras_batchfix` imports this package.

    Python sets `sys.argv[0]` to "-m" until the `__main__` module is found; the
    command line then parses its arguments before importing Keras, so `--help`
    and `--version` import no backend.
    """
    argv = getattr(sys, "orig_argv", [])
    return sys.argv[:1] == ["-m"] and any(
        arg == "-m" + __name__ or (arg == "-m" and following == __name__)
        for arg, following in zip(argv, argv[1:] + [""])
    )


# Old module paths (before the subpackages) still import, with a warning.
from keras_batchfix import _moved  # noqa: E402

if not any(isinstance(f, _moved.MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_moved.MovedModuleFinder())

if not _starting_cli():
    # Importing the package registers its serializable classes with Keras, so
    # `keras.models.load_model` finds them after a plain `import keras_batchfix`.
    _load_api()
