"""Import TensorFlow with Keras 2 (tf_keras) as `tf.keras`.

tensorflow-model-optimization only works with Keras 2, and TF 2.21 defaults to Keras 3, so the
switch must be set before TensorFlow is imported anywhere in the process. Every module that needs
TensorFlow imports it from here: `from compressor.core._tf import tf, keras`.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from compressor.core.quiet import quiet_stderr  # noqa: E402

with quiet_stderr():  # absl/oneDNN/CUDA start-up lines that TF_CPP_MIN_LOG_LEVEL does not stop
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402

tf.get_logger().setLevel("ERROR")

__all__ = ["tf", "keras"]
