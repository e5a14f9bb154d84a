"""Diagnostics: does a loss, or a model's training loss, depend on how Keras batches it?

* `loss_check`: `diagnose(loss, y_true, y_pred)`, for a loss function;
* `model_check`: `diagnose_model(model, x, y)`, for a compiled model's
  `compute_loss`;
* `verdicts`: the verdict words, fixes and report lines both share;
* `split_weights`: how a split of the batch reweighs its samples;
* `loss_probe`, `model_probe`: the evaluations behind the measurements.

A replica split is simulated with `keras_batchfix.replicas.ReplicaSimulation`.
`keras_batchfix.diagnose` and `keras_batchfix.diagnose_model` are the public
entry points.
"""
