"""Training: fine-tuning that keeps zeros, tf.distribute."""
