"""``horovod.tensorflow.keras.callbacks`` for Keras 3: the classes of ``hvd_lb.tf.callbacks``."""
from ..callbacks import (BroadcastGlobalVariablesCallback, MetricAverageCallback,  # noqa: F401
                         LearningRateScheduleCallback, LearningRateWarmupCallback, BestModelCheckpoint)
from ..callbacks import __all__  # noqa: F401
