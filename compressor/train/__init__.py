"""Training: fine-tuning that keeps zeros, tf.distribute, quantization-aware fine-tuning."""
