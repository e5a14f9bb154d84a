import importlib.util
import json

import numpy as np
import pytest

from keras_batchfix import EMACount, GlobalCount, LocalCount, SSDMultiboxLoss
from tests.helpers.processes import printed_line
from tests.helpers.ssd_problem import NUM_CLASSES, ssd_problem
from tests.helpers.training import fit_dense

def test_one_device_divisors():
    for normalizer in (LocalCount(), GlobalCount(), EMACount(momentum=0.0)):
        assert float(normalizer.divisor(np.float32(7.0))) == 7.0
        assert float(normalizer.divisor(np.float32(0.0))) == 1.0  # no positives
        # A negative count is a bug upstream: NaN, never a silent clamp to 1.
        assert np.isnan(float(normalizer.divisor(np.float32(-2.0))))


def test_ema_divisor_reads_and_update_writes():
    normalizer = EMACount(momentum=0.5, initial_value=10.0)
    assert float(normalizer.divisor(np.float32(4.0))) == 7.0
    assert float(normalizer.divisor(np.float32(2.0))) == 6.0  # still from 10
    assert float(normalizer.ema) == 10.0
    normalizer.update()  # the last candidate becomes the EMA
    assert float(normalizer.ema) == 6.0
    assert float(normalizer.divisor(np.float32(2.0))) == 4.0


def test_global_count_makes_mirrored_training_equal_one_device(mirrored_strategy):
    x, y, kernel, bias = ssd_problem(0, 37)  # last batch of 5 splits 3 + 2
    results = {}
    for name, normalizer in (("global", GlobalCount()), ("local", LocalCount())):
        loss = SSDMultiboxLoss(
            NUM_CLASSES, mining="per_image", from_logits=True, normalizer=normalizer
        )
        single = fit_dense(loss, x, y, kernel, bias, batch_size=8, epochs=2)
        mirrored = fit_dense(
            loss, x, y, kernel, bias, batch_size=8, epochs=2,
            strategy=mirrored_strategy,
        )
        results[name] = (single, mirrored)
    single, mirrored = results["global"]
    for got, want in zip(mirrored, single):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Per-replica counts differ here, so the local normalizer cannot match:
    # the test above is not passing for a trivial reason.
    single, mirrored = results["local"]
    np.testing.assert_allclose(single[0], results["global"][0][0], rtol=1e-6)
    assert not np.allclose(mirrored[0], single[0], rtol=1e-4, atol=1e-5)


def test_normalizers_serialize_with_the_loss():
    loss = SSDMultiboxLoss(NUM_CLASSES, normalizer=GlobalCount())
    restored = SSDMultiboxLoss.from_config(loss.get_config())
    assert isinstance(restored.normalizer, GlobalCount)


def test_bad_normalizer():
    with pytest.raises(ValueError, match="normalizer"):
        SSDMultiboxLoss(NUM_CLASSES, normalizer="global")


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="needs JAX"
)
def test_jax_data_parallel_equals_one_device():
    results = json.loads(printed_line("tests.helpers.jax_data_parallel", "RESULT ", 600))
    # The composition matrix and 2 CenterLoss problems.
    from tests.helpers.composition import ACCUMULATION_CELLS, CELLS

    assert len(results) == len(CELLS) + len(ACCUMULATION_CELLS) + 2, sorted(results)
    for name, result in results.items():
        assert result["max_abs_change"] > 1e-3, name  # training moved the weights
        assert result["max_abs_gap"] < 1e-5, (name, result)
