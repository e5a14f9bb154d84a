"""`MultiWorkerMirroredStrategy` that Keras 3's TensorFlow `fit` can run with.

With 2+ workers, Keras 3.15's `fit` fails under
`tf.distribute.MultiWorkerMirroredStrategy` for any model and loss, because
its TensorFlow trainer (`keras/src/backend/tensorflow/trainer.py`) calls
`strategy.reduce` with two kinds of value the multi-worker strategy rejects:

1. `_maybe_symbolic_build` reduces the first batch, a tuple `(x, y)` of
   `PerReplica` values, in one call (`reduce("MEAN", batch, axis=None)`);
   `Strategy.reduce` takes one value, not a nest ("TODO(josh11b): support
   `value` being a nest" in `tensorflow/python/distribute/distribute_lib.py`),
   and the collective reduction tries to convert the tuple to a tensor:
   "ValueError: Attempt to convert a value (PerReplica:{...}) with an
   unsupported type ... to a Tensor". Keras only reads the shapes and dtypes
   of the result, to build the model, loss and metrics symbolically.
2. After every step, `reduce_per_replica` reduces each logged metric, a
   scalar, with `reduce("MEAN", value, axis=0)`: "Invalid reduction dimension
   0 for input with 0 dimensions".

This subclass overrides only the public `reduce`: a nest is reduced value by
value, and a scalar has no axis to reduce along, so it is reduced across
replicas only (`axis=None`). What TensorFlow documents `reduce` for (one
`DistributedValues` or tensor, an axis it has) is reduced exactly as before.
Everything else, the gradient all-reduce and this package's `all_reduce_sum`
included, is the unchanged TensorFlow strategy.

Import it from this module (it imports TensorFlow, which the rest of the
package imports only when the backend is TensorFlow):

```python
from keras_batchfix.integrations.multi_worker import MultiWorkerMirroredStrategy

strategy = MultiWorkerMirroredStrategy()  # reads TF_CONFIG, as TensorFlow's
with strategy.scope():
    model = build_model()
    model.compile(optimizer="sgd", loss=keras_batchfix.SSDMultiboxLoss(
        num_classes, mining="per_image", normalizer=keras_batchfix.GlobalCount()))
model.fit(dataset, epochs=10)
```
"""

import tensorflow as tf


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """TensorFlow's multi-worker strategy; its `reduce` takes what Keras 3 passes.

    Same arguments as TensorFlow's strategy. See the module docstring for the
    two Keras 3.15 calls this fixes.
    """

    def reduce(self, reduce_op, value, axis):
        reduce_one = super().reduce

        def reduce_value(v):
            local = self.experimental_local_results(v)[0]
            scalar_axis = axis is not None and local.shape.rank == 0
            return reduce_one(reduce_op, v, axis=None if scalar_axis else axis)

        return tf.nest.map_structure(reduce_value, value)
