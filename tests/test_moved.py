"""The module paths of 0.1 still import, forward to the new modules and warn."""

import importlib
import importlib.util
import sys

import pytest

from keras_batchfix import _moved


@pytest.mark.parametrize("old, new", sorted(_moved.MOVED.items()))
def test_an_old_path_forwards_to_the_new_module_with_a_warning(old, new):
    if new.startswith("keras_batchfix.integrations.") and old != "keras_batchfix.multi_worker":
        pytest.importorskip("keras_hub")
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"`{old}` moved to `{new}`"):
        module = importlib.import_module(old)
    target = importlib.import_module(new)
    public = [name for name in vars(target) if not name.startswith("_")]
    assert public and all(getattr(module, name) is getattr(target, name) for name in public)


def test_the_new_paths_are_modules_of_the_package_and_the_old_ones_are_not():
    for old, new in _moved.MOVED.items():
        assert importlib.util.find_spec(new).origin.endswith(".py")
        assert importlib.util.find_spec(old).origin is None  # only the forwarder
