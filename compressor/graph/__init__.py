"""The model graph: surgery (physical unit removal) and MAC counts."""
