"""Model loading: safety checks, Keras 3 import, saving."""
