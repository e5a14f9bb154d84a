"""Fixed losses for other libraries' models and for distributed setups.

Each module wraps one outside model or training setup whose loss Keras
reduces wrongly under replicas or accumulation: keras-hub's RetinaNet and
D-FINE detectors (`retinanet`, `d_fine`) and causal language models
(`causal_lm`), TensorFlow's multi-worker strategy (`multi_worker`) and torch
DDP under Keras's `fit` (`torch_ddp`). Import the module you need; the
package imports none of them, so their optional dependencies (keras-hub,
torch) are needed only when you do.
"""
