"""The composition matrix under `MirroredStrategy` over 2 logical CPUs.

Every cell of tests/helpers/composition.py (each piece alone, and in pairs in one
model) trains for 2 epochs under the strategy and must end within 1e-5 of
one device. tests/integrations/test_multi_worker.py runs the same cells with 2 worker
processes and tests/test_normalizers.py under JAX's `DataParallel`.
"""

import keras
import pytest

from tests.helpers.composition import CELLS, cell_id, fit_cell, initial_weights, max_gap

TOLERANCE = 1e-5


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_mirrored_equals_one_device(cell, mirrored_strategy):
    single = fit_cell(cell)
    assert max_gap(single, initial_weights(cell)) > 1e-2  # it trained
    mirrored = fit_cell(cell, strategy=mirrored_strategy)
    assert max_gap(mirrored, single) < TOLERANCE


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="the reference")
@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_every_cell_trains(cell):
    assert max_gap(fit_cell(cell), initial_weights(cell)) > 1e-2
