"""keras-batchfix: losses whose scale does not depend on how Keras batches them."""

from keras_batchfix.center_loss import CenterLoss
from keras_batchfix.compensate import compensate
from keras_batchfix.normalized_loss import NormalizedLoss
from keras_batchfix.normalizers import LocalCount
from keras_batchfix.ssd_loss import SSDMultiboxLoss

__version__ = "0.1.0"
