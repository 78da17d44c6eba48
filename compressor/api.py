"""The Python API, mirroring the CLI: `compress(...)` for notebooks, `compress_file` and `demo`.

```python
from compressor.api import compress
report = compress("model.keras", "data.npz", "artifacts/m", recipe="recipe.yaml")
```
"""
from __future__ import annotations

import json
from pathlib import Path

from compressor.config.recipe import Recipe, load_recipe
from compressor.core import inputs as model_inputs
from compressor.core.errors import CompressorError
from compressor.data.sources import load_dataset
from compressor.run.progress import Reporter
from compressor.train import distribute

DEMO_TRAIN_EPOCHS = 10


def _as_recipe(recipe: Recipe | str | Path | dict | None) -> Recipe:
    from compressor.config.recipe import parse_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    return load_recipe(recipe)


def _as_data(data, recipe: Recipe):
    """A data set object (arrays or a stream) as is, else the spec resolved with the recipe's data settings."""
    from compressor.config.task import expects_class_labels

    if isinstance(data, (str, Path)):
        return load_dataset(data, recipe.data, expects_class_labels(recipe))
    return data


def compress(model, data, out, recipe=None, *, force: bool = False, quiet: bool = False,
             reporter: Reporter | None = None, trust_model_code: bool = False,
             custom_objects: list[str] | str | None = None, resume: bool = False) -> dict:
    """Compress a tf_keras model object or a model file; returns the report dict (also in `out`).

    A model file is never allowed to run code it carries unless `trust_model_code` is set;
    `custom_objects` names modules (pkg.mod) whose tf-keras layer classes the file may use.
    `resume` continues an interrupted run on `out` (model files only: the checkpoint is bound to
    the file's hash).
    """
    if isinstance(model, (str, Path)):
        return compress_file(model, data, out, recipe, force=force, reporter=reporter or Reporter(quiet),
                             trust_model_code=trust_model_code, custom_objects=custom_objects, resume=resume)
    if resume:
        raise CompressorError("resume needs the model as a file path (its checkpoint is bound to the file's hash); "
                              "pass the path of the interrupted run's model")
    recipe = _as_recipe(recipe)
    _start_strategy(recipe)
    dataset = _as_data(data, recipe)
    _check_out(out, force)
    from compressor.load.flatten import flatten_nested  # a model object is flattened as a file's is

    flat, notes = flatten_nested(model)
    return _run_into(out, force, (), lambda: (flat, getattr(model, "name", "model"), notes), dataset, recipe,
                     reporter or Reporter(quiet))


def _run_into(out, force: bool, inputs: tuple, get_model, dataset, recipe, reporter, finish=None,
              checkpoint=None, resume: bool = False) -> dict:
    """Build the result in a hidden sibling folder and swap it into `out` only when complete, so a
    failed or interrupted run never costs the previous result (compressor.run.outdir). The stage
    checkpoint (compressor.run.checkpoint) outlives an interrupted run and is removed by a finished one."""
    from compressor.run import outdir
    from compressor.run.outdir import OutputFolder

    model, source, notes = get_model()
    if not distribute.is_chief():
        return _run_as_worker(model, source, notes, dataset, recipe, reporter)
    folder = OutputFolder(out, force, inputs)
    try:
        with folder as work:
            try:
                report = _build(folder, work, model, source, notes, dataset, recipe, reporter, finish, checkpoint,
                                resume)
            except OSError as exc:
                if not outdir.is_disk_full(exc):
                    raise
                where = (checkpoint.folder,) if checkpoint is not None else ()
                raise outdir.disk_full(exc, Path(out), work, where, _result_bytes(model)) from None
    except outdir.DiskFull:
        if checkpoint is not None:  # its models take room too; a rerun starts over
            checkpoint.discard()
        raise
    reporter.step(f"result complete in {out}")
    return report


def _result_bytes(model) -> int:
    """About what a result and its checkpoint take: float32 weights in ~8 files, plus plots and reports."""
    return 8 * 4 * int(model.count_params()) + 2**20


def _build(folder, work, model, source, notes, dataset, recipe, reporter, finish, checkpoint, resume) -> dict:
    from compressor.run.pipeline import compress as run_pipeline

    out = folder.out
    if checkpoint is not None and not resume and checkpoint.discard():
        reporter.warn(f"discarded the checkpoint of an interrupted run on '{out}' (start it with --resume "
                      "to continue such a run instead)")
    try:
        report = run_pipeline(model, dataset, recipe, work, source=source, reporter=reporter, load_notes=notes,
                              checkpoint=checkpoint, resume=resume)
    except CompressorError as exc:
        if not (work / "report.json").is_file():
            raise
        folder.commit()  # complete, but a file failed verification: the report says which and why
        if checkpoint is not None:
            checkpoint.discard()
        raise CompressorError(str(exc).replace(str(work), str(out))) from None
    if finish is not None:
        finish(work)
    folder.commit()
    if checkpoint is not None:
        checkpoint.discard()
    return report


def _start_strategy(recipe: Recipe) -> None:
    distribute.configure(recipe.distribute, recipe.batch_size)


def _check_out(out, force: bool, inputs: tuple = ()) -> None:
    """--out is the chief's: the other workers of a cluster never look at it."""
    from compressor.run.outdir import check_out_dir

    if distribute.is_chief():
        check_out_dir(out, force, inputs)


def _run_as_worker(model, source: str, notes: list[str], dataset, recipe, reporter) -> dict:
    """A non-chief worker trains its share of every fine-tune in step with the chief, writes into a
    scratch folder that is deleted afterwards (TF's advice for non-chief workers) and leaves --out alone."""
    import tempfile

    from compressor.run.pipeline import compress as run_pipeline

    with tempfile.TemporaryDirectory(prefix="compressor-worker-") as scratch:
        report = run_pipeline(model, dataset, recipe, scratch, source=source, reporter=reporter, load_notes=notes)
    reporter.step("worker done: the chief writes the result")
    return report


def compress_file(model_path, data, out, recipe=None, *, force: bool = False, reporter: Reporter | None = None,
                  trust_model_code: bool = False, custom_objects: list[str] | str | None = None,
                  resume: bool = False) -> dict:
    """Everything is validated (recipe, data, output folder, model) before any training starts.
    Each finished stage is checkpointed beside `out`; `resume` continues an interrupted run with
    the same inputs (checked by hash) from its last finished stage."""
    from compressor.data.checks import check_model
    from compressor.data.sources import check_against_model
    from compressor.load.model_io import file_sha256, load_model
    from compressor.load.safety import make_policy
    from compressor.run.checkpoint import checked_folder

    reporter = reporter or Reporter()
    policy = make_policy(trust_model_code, custom_objects)
    recipe_path = recipe if isinstance(recipe, (str, Path)) else None
    data_path = data if isinstance(data, (str, Path)) and Path(data).exists() else None
    recipe = _as_recipe(recipe)
    _start_strategy(recipe)  # before TensorFlow runs anything (loading the model or the data may)
    dataset = _as_data(data, recipe)
    inputs = (model_path, data_path, recipe_path)
    digest = file_sha256(model_path) if Path(model_path).exists() else None
    checkpoint = _checkpoint(out, recipe, (model_path, digest), data, dataset, policy)
    if resume and digest is not None:
        checkpoint.check()  # a wrong or missing checkpoint fails before the model is loaded
    checked_folder(checkpoint.folder)  # a planted link or a foreign file under its name fails before any work
    _check_out(out, force, inputs)
    loaded = load_model(model_path, policy)
    model = loaded.model
    from compressor.config.task import resolve

    check_model(model)
    check_against_model(dataset, model_inputs.shapes(model), task=resolve(recipe, model))
    notes = list(loaded.warnings)  # includes one line per layer class the stages leave unpruned
    for note in dict.fromkeys(notes):
        (reporter.step if note.startswith("imported from") else reporter.warn)(note)
    reporter.step(f"loaded {model_path} ({loaded.format})")
    report = _run_into(out, force, inputs, lambda: (model, str(model_path), [loaded.format, *notes]), dataset,
                       recipe, reporter, checkpoint=checkpoint, resume=resume)
    if digest is not None and file_sha256(model_path) != digest:
        raise CompressorError(f"input model '{model_path}' changed during the run; this is a bug, please report it")
    return report


def _checkpoint(out, recipe: Recipe, model: tuple, data_spec, dataset, policy):
    """The run's stage checkpoint, bound to these exact inputs by hash; it also names them (absolute
    paths), so `--resume OUT` alone can continue the run. `model`: (path, SHA-256)."""
    import os

    from compressor import __version__
    from compressor.load.model_io import load_model
    from compressor.run.checkpoint import Checkpoint, data_digest, recipe_digest

    model_path, model_digest = model
    fingerprint = {"tool_version": __version__, "recipe": recipe_digest(recipe), "model": model_digest,
                   "data": data_digest(data_spec, dataset)}
    dumped = recipe.model_dump(mode="json")
    fields = {k: json.dumps(v, sort_keys=True) for k, v in dumped.items()}
    spec = None  # a data set object cannot be named again
    if isinstance(data_spec, (str, Path)):
        spec = os.path.abspath(data_spec) if Path(data_spec).exists() else str(data_spec)
    inputs = {"model": os.path.abspath(model_path), "data": spec, "recipe": dumped}
    return Checkpoint(out, fingerprint, lambda path: load_model(path, policy).model, recipe_fields=fields,
                      inputs=inputs)


def demo(out, recipe=None, *, force: bool = False, reporter: Reporter | None = None) -> dict:
    """Train the source article's MLP on the embedded MNIST digits and run the recipe end to end."""
    from compressor.load.model_io import save_model_atomic
    from compressor.train.training import accuracy, train_reference

    reporter = reporter or Reporter()
    recipe = _as_recipe(recipe)
    _start_strategy(recipe)
    _check_out(out, force)
    data = load_dataset("mnist5k")
    reporter.step(f"demo: training Flatten -> Dense(128, relu) -> Dense(10, softmax) on {len(data.x_train)} "
                  "MNIST digits")
    model = train_reference(data, epochs=DEMO_TRAIN_EPOCHS, seed=recipe.seed,
                            progress=reporter.epoch_callback("train reference model", DEMO_TRAIN_EPOCHS))
    reporter.step(f"reference model test accuracy {accuracy(model, data.x_test, data.y_test):.4f}")
    return _run_into(out, force, (), lambda: (model, "demo: reference MLP 784-128-10 on mnist5k", []), data,
                     recipe, reporter, finish=lambda work: save_model_atomic(model, work / "dense.keras"))


def inspect(path, *, trust_model_code: bool = False, custom_objects: list[str] | str | None = None) -> dict:
    """Per-tensor sizes, zeros and storage of a .tflite, .onnx or Keras file (`compressor inspect`).
    Keras files are loaded through model_io, which checks the stored config before deserialising."""
    from compressor.load.model_io import load_model
    from compressor.load.safety import make_policy
    from exporters.inspect import inspect_file

    policy = make_policy(trust_model_code, custom_objects)
    return inspect_file(path, load_keras=lambda keras_path: load_model(keras_path, policy).model)
