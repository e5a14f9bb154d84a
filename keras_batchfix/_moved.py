"""Module paths of keras-batchfix 0.1, importable with a `DeprecationWarning`.

The package's modules moved into subpackages (`ssd/`, `training/`,
`diagnostics/`, `spikes/`, `integrations/`). Importing an old path gives a
module that forwards every attribute to the new one and warns once. The
names exported by `keras_batchfix` itself did not move.
"""

import importlib
import importlib.abc
import importlib.util
import types
import warnings

REMOVED_IN = "0.3"

# Old module -> new module.
MOVED = {
    "keras_batchfix.anchors": "keras_batchfix.ssd.anchors",
    "keras_batchfix.box_matching": "keras_batchfix.ssd.box_matching",
    "keras_batchfix.ssd_loss": "keras_batchfix.ssd.loss",
    "keras_batchfix.model": "keras_batchfix.training.model",
    "keras_batchfix.accumulation": "keras_batchfix.training.accumulation",
    "keras_batchfix.spike_monitor": "keras_batchfix.spikes.monitor",
    "keras_batchfix.spike_recording": "keras_batchfix.spikes.recording",
    "keras_batchfix.spike_analysis": "keras_batchfix.spikes.analysis",
    "keras_batchfix.spike_report": "keras_batchfix.spikes.report",
    "keras_batchfix.retinanet": "keras_batchfix.integrations.retinanet",
    "keras_batchfix.causal_lm": "keras_batchfix.integrations.causal_lm",
    "keras_batchfix.multi_worker": "keras_batchfix.integrations.multi_worker",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of `MOVED`; each loads as a forwarding module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        new = MOVED[module.__name__]
        warnings.warn(
            f"Module `{module.__name__}` moved to `{new}`; import it from "
            f"there (or its public names from `keras_batchfix`). The old path "
            f"goes away in keras-batchfix {REMOVED_IN}.",
            DeprecationWarning,
            stacklevel=2,
        )
        target = importlib.import_module(new)
        module.__getattr__ = lambda name: getattr(target, name)
        module.__dir__ = lambda: dir(target)
        module.__doc__ = target.__doc__
