"""Configuration: the recipe and the task (loss, metric, direction)."""
