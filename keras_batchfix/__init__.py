"""keras-batchfix: losses whose scale does not depend on how Keras batches them."""

from keras_batchfix.accumulation_weights import window_weights
from keras_batchfix.anchors import num_anchors_per_cell, ssd_anchors
from keras_batchfix.box_matching import encode_ssd_targets, match_anchors
from keras_batchfix.center_loss import CenterLoss
from keras_batchfix.compensate import compensate
from keras_batchfix.diagnose import diagnose
from keras_batchfix.diagnose_model import diagnose_model
from keras_batchfix.normalized_loss import NormalizedLoss
from keras_batchfix.normalized_loss import count_weight
from keras_batchfix.normalizers import EMACount
from keras_batchfix.normalizers import GlobalCount
from keras_batchfix.normalizers import LocalCount
from keras_batchfix.model import Model
from keras_batchfix.model import NormalizerUpdates
from keras_batchfix.spike_monitor import SpikeMonitor
from keras_batchfix.ssd_loss import SSDMultiboxLoss

__version__ = "0.1.0"
