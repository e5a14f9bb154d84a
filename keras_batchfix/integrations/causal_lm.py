"""keras-hub's causal language models with a loss that is a mean over valid tokens.

keras-hub 0.32's `CausalLM` compiles `SparseCategoricalCrossentropy(from_logits=True)`
with Keras's default reduction and hands the padding mask as `sample_weight`,
so a batch of `B` sequences padded to length `T` trains on

    sum over valid tokens t of CE_t / (B * T)

padding included in the divisor: a token of a short last batch, or of a batch
padded to a shorter length, weighs more. `token_loss()` divides by the valid
tokens instead, and the package's training step (`GPT2CausalLM` here, or
`keras_batchfix.NormalizerUpdates` before any other `CausalLM`) with
`compile(..., micro_batches=k)` makes the mean one over the valid tokens of
the whole batch, all its slices and all replicas:

    sum over valid tokens t of the batch of CE_t / (valid tokens of the batch)

Needs keras-hub (tested with 0.32.0).

Example:

```python
from keras_batchfix.integrations import causal_lm

model = causal_lm.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
model.compile(optimizer=keras.optimizers.AdamW(1e-4),
              loss=causal_lm.token_loss(), micro_batches=4)
model.fit(texts, batch_size=32)    # one update per 32 texts, run as 4 x 8

# Any other CausalLM:
class GemmaCausalLM(keras_batchfix.NormalizerUpdates, keras_hub.models.GemmaCausalLM):
    pass
```
"""

import keras
import keras_hub

import keras_batchfix



def token_loss():
    """Next-token cross-entropy divided by the sum of `sample_weight` (valid tokens)."""
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )


@keras.saving.register_keras_serializable(package="keras_batchfix")
class GPT2CausalLM(keras_batchfix.NormalizerUpdates, keras_hub.models.GPT2CausalLM):
    """keras-hub's `GPT2CausalLM` with `compile(..., micro_batches=k)`."""
