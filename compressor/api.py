"""The Python API, mirroring the CLI: `compress(...)` for notebooks, `compress_file` and `demo`.

```python
from compressor.api import compress
report = compress("model.keras", "data.npz", "artifacts/m", recipe="recipe.yaml")
```
"""
from __future__ import annotations

from pathlib import Path

from compressor.data import Dataset, load_dataset
from compressor.errors import CompressorError
from compressor.progress import Reporter
from compressor.recipe import Recipe, load_recipe

DEMO_TRAIN_EPOCHS = 10


def _as_recipe(recipe: Recipe | str | Path | dict | None) -> Recipe:
    from compressor.recipe import parse_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    return load_recipe(recipe)


def _as_data(data: Dataset | str | Path) -> Dataset:
    return data if isinstance(data, Dataset) else load_dataset(data)


def compress(model, data, out, recipe=None, *, force: bool = False, quiet: bool = False,
             reporter: Reporter | None = None) -> dict:
    """Compress a tf_keras model object or a model file; returns the report dict (also in `out`)."""
    if isinstance(model, (str, Path)):
        return compress_file(model, data, out, recipe, force=force, reporter=reporter or Reporter(quiet))
    from compressor.pipeline import compress as run_pipeline, prepare_out_dir

    recipe, dataset = _as_recipe(recipe), _as_data(data)
    prepare_out_dir(out, force)
    return run_pipeline(model, dataset, recipe, out, source=getattr(model, "name", "model"),
                        reporter=reporter or Reporter(quiet))


def compress_file(model_path, data, out, recipe=None, *, force: bool = False, reporter: Reporter | None = None) -> dict:
    """Everything is validated (recipe, data, output folder, model) before any training starts."""
    from compressor.model_io import file_sha256, load_model, unsupported_layers
    from compressor.pipeline import compress as run_pipeline, prepare_out_dir

    reporter = reporter or Reporter()
    recipe = _as_recipe(recipe)
    dataset = _as_data(data)
    out = Path(out)
    if out.resolve() == Path(model_path).resolve() or Path(model_path).resolve().is_relative_to(out.resolve()):
        raise CompressorError(f"--out '{out}' contains the input model; choose a different output folder")
    prepare_out_dir(out, force)
    digest = file_sha256(model_path) if Path(model_path).exists() else None
    loaded = load_model(model_path)
    notes = list(loaded.warnings)
    for name in unsupported_layers(loaded.model):
        notes.append(f"layer {name} is not supported by the pruning stages and is left unpruned")
    for note in dict.fromkeys(notes):
        reporter.warn(note)
    reporter.step(f"loaded {model_path} ({loaded.format})")
    report = run_pipeline(loaded.model, dataset, recipe, out, source=str(model_path), reporter=reporter,
                          load_notes=[loaded.format, *notes])
    if digest is not None and file_sha256(model_path) != digest:
        raise CompressorError(f"input model '{model_path}' changed during the run; this is a bug, please report it")
    return report


def demo(out, recipe=None, *, force: bool = False, reporter: Reporter | None = None) -> dict:
    """Train the source article's MLP on the embedded MNIST digits and run the recipe end to end."""
    from compressor.model_io import save_model_atomic
    from compressor.pipeline import compress as run_pipeline, prepare_out_dir
    from compressor.training import accuracy, train_reference

    reporter = reporter or Reporter()
    recipe = _as_recipe(recipe)
    out = prepare_out_dir(out, force)
    data = load_dataset("mnist5k")
    reporter.step(f"demo: training Flatten -> Dense(128, relu) -> Dense(10, softmax) on {len(data.x_train)} MNIST digits")
    model = train_reference(data, epochs=DEMO_TRAIN_EPOCHS, seed=recipe.seed,
                            progress=reporter.epoch_callback("train reference model", DEMO_TRAIN_EPOCHS))
    reporter.step(f"reference model test accuracy {accuracy(model, data.x_test, data.y_test):.4f}")
    report = run_pipeline(model, data, recipe, out, source="demo: reference MLP 784-128-10 on mnist5k",
                          reporter=reporter)
    save_model_atomic(model, out / "dense.keras")
    return report
