"""What "quality" means for this model: the loss it is fine-tuned with, the metric the budget is
counted in, and which way is better.

Top-1 accuracy on integer class labels is the default, so classification recipes need none of this;
a regression model names `mae` and a budget in its units, a multi-label model `auc`, a multi-output
model one loss and metric per output. The same `Task` scores Keras models and exported files over
batches streamed from the data, so the number compared with the budget during the stages is the
number the report shows for every file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compressor.core._tf import keras
from compressor.core.errors import CompressorError
from compressor.load.safety import user_function

ACCURACY = ("accuracy", "acc", "sparse_categorical_accuracy")
HIGHER = ACCURACY + ("auc", "binary_accuracy", "categorical_accuracy", "precision", "recall",
                     "top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy", "r2_score", "f1_score",
                     "iou", "mean_iou")
LOWER = ("mae", "mse", "rmse", "msle", "mape", "mean_absolute_error", "mean_squared_error", "root_mean_squared_error",
         "mean_squared_logarithmic_error", "mean_absolute_percentage_error", "huber", "logcosh", "log_cosh",
         "binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy", "kl_divergence",
         "kld", "poisson", "hinge", "squared_hinge", "categorical_hinge", "cosine_similarity_loss")
#: Metric classes for names `keras.metrics.get` leaves unresolved or resolves to a stateless function
#: whose per-batch mean would be wrong (AUC and RMSE are not means of per-sample values).
METRIC_CLASSES = {"auc": "AUC", "precision": "Precision", "recall": "Recall", "rmse": "RootMeanSquaredError",
                  "root_mean_squared_error": "RootMeanSquaredError", "r2_score": "R2Score", "mean_iou": "MeanIoU"}
#: The loss that goes with a metric when the recipe says `loss: auto`.
LOSS_FOR_METRIC = {"mae": "mae", "mean_absolute_error": "mae", "mse": "mse", "mean_squared_error": "mse",
                   "rmse": "mse", "root_mean_squared_error": "mse", "msle": "msle", "mape": "mape",
                   "auc": "binary_crossentropy", "binary_accuracy": "binary_crossentropy",
                   "precision": "binary_crossentropy", "recall": "binary_crossentropy",
                   "categorical_accuracy": "categorical_crossentropy"}
SPARSE = "sparse_categorical_crossentropy"
BINARY = "binary_crossentropy"


def _import(spec: str, what: str):
    """The user's `pkg.mod:func` (code that runs): a plain function or a Keras Metric / Loss class."""
    return user_function(spec, what, (keras.metrics.Metric,) if what == "metric" else (keras.losses.Loss,))


def _per_output(value, names: list[str], what: str) -> list[str]:
    """One entry per model output: a single name is used for every output."""
    values = [value] * len(names) if isinstance(value, str) else list(value)
    if len(values) != len(names):
        raise CompressorError(f"recipe {what} lists {len(values)} entries but the model has {len(names)} outputs "
                              f"({', '.join(names)}); give one per output or a single name")
    return values


def _activation(model, output_name: str) -> str:
    layer = model.get_layer(output_name) if output_name in [each.name for each in model.layers] else model.layers[-1]
    layer = getattr(layer, "layer", layer)  # see through tfmot's wrapper
    if type(layer).__name__ == "Softmax":
        return "softmax"
    return getattr(getattr(layer, "activation", None), "__name__", "")


@dataclass
class Score:
    """A model's or a file's quality on one split: the budget metric, every output's metric, and
    per-sample top-1 correctness when a paired test applies."""

    value: float
    per_output: list[dict] = field(default_factory=list)
    correct: np.ndarray | None = None
    samples: int = 0


@dataclass
class Task:
    """Resolved loss, metric, direction and budget for one model (see `resolve`)."""

    output_names: list[str]
    losses: list[str]
    metrics: list[str]
    output: int
    direction: str
    budget: float
    units: list[int]
    activations: list[str]
    data: object = None  # the bound data set (compressor.data.sources), for `keras` / `file`

    @property
    def name(self) -> str:
        return self.metrics[self.output]

    def sparse(self, i: int) -> bool:
        """Output `i` is trained on integer class labels."""
        return self.losses[i] == SPARSE

    def binary(self, i: int) -> bool:
        """Output `i` is one unit trained on 0/1 labels (binary classification: thresholded, not argmax)."""
        return self.losses[i] == BINARY and self.units[i] == 1

    def threshold(self, i: int) -> float:
        """Where a binary output's prediction turns to class 1: 0.5 of a sigmoid, 0 of a logit."""
        return 0.5 if self.activations[i] == "sigmoid" else 0.0

    def classes(self, i: int, pred: np.ndarray) -> np.ndarray:
        """Predicted class ids of output `i` (top-1, or thresholded for a binary output)."""
        pred = pred.reshape(len(pred), -1)
        return (pred[:, 0] > self.threshold(i)).astype(np.int64) if self.binary(i) else pred.argmax(axis=1)

    @property
    def is_accuracy(self) -> bool:
        """The budget is top-1 (or binary) accuracy on class labels: `accuracy` fields are filled."""
        return self.name in ACCURACY and (self.sparse(self.output) or self.binary(self.output))

    @property
    def paired(self) -> bool:
        """Per-sample correctness of two files on the same samples (McNemar, Wilson interval) applies
        only to single-output classification."""
        return self.is_accuracy and len(self.output_names) == 1

    def drop(self, baseline: float, value: float) -> float:
        """How much worse `value` is than `baseline`, in the metric's units (negative: better)."""
        return baseline - value if self.direction == "higher" else value - baseline

    def within(self, baseline: float, value: float) -> bool:
        return self.drop(baseline, value) <= self.budget

    def limit(self, baseline: float) -> float:
        """The worst value still within the budget of `baseline`."""
        return baseline - self.budget if self.direction == "higher" else baseline + self.budget

    def budget_text(self) -> str:
        """The budget as a reader says it: "1.00% accuracy", "0.05 mae"."""
        return f"{self.budget:.2%} accuracy" if self.is_accuracy else f"{self.budget:g} {self.name}"

    def describe(self) -> dict:
        return {"name": self.name, "direction": self.direction, "budget": self.budget,
                "output": self.output_names[self.output], "per_output": dict(zip(self.output_names, self.metrics))}

    # ------------------------------------------------------------------ training

    def keras_losses(self):
        """Loss objects for `model.compile`, one per output (crossentropies from logits unless the
        output layer applies softmax/sigmoid)."""
        built = [self._loss(name, act) for name, act in zip(self.losses, self.activations)]
        return built[0] if len(built) == 1 else built

    @staticmethod
    def _loss(name: str, activation: str):
        if ":" in name:
            found = _import(name, "loss")
            return found() if isinstance(found, type) else found
        probability = activation in ("softmax", "sigmoid")
        classes = {SPARSE: keras.losses.SparseCategoricalCrossentropy,
                   "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
                   "binary_crossentropy": keras.losses.BinaryCrossentropy}
        if name in classes:
            return classes[name](from_logits=not probability)
        found = keras.losses.get(name)
        if not callable(found):
            raise ValueError(f"unknown loss {name!r}")
        return found

    def compile_metrics(self):
        """What Keras prints while fitting: only the default case needs it (training accuracy)."""
        return ["accuracy"] if self.is_accuracy and len(self.output_names) == 1 else None

    # ------------------------------------------------------------------ scoring

    def new_metric(self, i: int):
        """A fresh stateful metric for output `i` (updated batch by batch, never on all data at once)."""
        name = self.metrics[i]
        if name in ACCURACY:
            if self.losses[i] == BINARY:
                return keras.metrics.BinaryAccuracy(name=name, threshold=self.threshold(i))
            cls = {SPARSE: keras.metrics.SparseCategoricalAccuracy,
                   "categorical_crossentropy": keras.metrics.CategoricalAccuracy}.get(self.losses[i])
            return (cls or keras.metrics.Accuracy)(name=name)
        if ":" in name:
            found = _import(name, "metric")
            if isinstance(found, type) and issubclass(found, keras.metrics.Metric):
                return found()
            return keras.metrics.MeanMetricWrapper(found, name=name.rpartition(":")[2])
        if name in METRIC_CLASSES:
            return getattr(keras.metrics, METRIC_CLASSES[name])()
        found = keras.metrics.get(name)
        if not callable(found):  # tf-keras hands an unknown name back unchanged
            raise ValueError(f"unknown metric {name!r}")
        if isinstance(found, keras.metrics.Metric):
            return type(found).from_config(found.get_config())
        return keras.metrics.MeanMetricWrapper(found, name=name)

    def evaluate(self, predict, batches) -> Score:
        """Score `predict` (x -> list of outputs, the model's order) over (x, y) batches."""
        metrics = [self.new_metric(i) for i in range(len(self.output_names))]
        correct = [] if self.paired else None
        samples = 0
        for x, y in batches:
            outs = predict(x)
            labels = list(y) if isinstance(y, (list, tuple)) else [y]
            for i, (metric, truth, pred) in enumerate(zip(metrics, labels, outs)):
                truth, pred = self._shaped(i, np.asarray(truth), np.asarray(pred))
                metric.update_state(truth, pred)
                if correct is not None:
                    correct.append(self.classes(i, pred) == truth.reshape(len(truth)))
            samples += len(x)
        if samples == 0:
            raise CompressorError("the evaluation split holds no samples; give the data a test split")
        values = [float(m.result().numpy()) for m in metrics]
        if correct is not None:  # exact (float64) and the same number the paired statistics use
            correct = np.concatenate(correct)
            values[0] = float(correct.mean())
        per = [{"output": n, "metric": m, "value": v} for n, m, v in zip(self.output_names, self.metrics, values)]
        return Score(values[self.output], per, correct, samples)

    def _shaped(self, i: int, truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.sparse(i):
            return truth.reshape(len(truth)), pred.reshape(len(pred), -1)
        if truth.size == pred.size:
            return truth.reshape(pred.shape).astype(np.float32), pred
        return truth, pred

    def keras(self, model, split: str = "budget") -> Score:
        """A Keras model's score on a split of the bound data ("budget": validation, else test)."""
        def predict(x):
            out = model(x, training=False)
            return [o.numpy() for o in out] if isinstance(out, (list, tuple)) else [out.numpy()]
        return self.evaluate(predict, self.data.batches(split))

    def file(self, runner, split: str = "test") -> Score:
        """An exported file's score, its outputs matched to the Keras outputs by name."""
        return self.evaluate(lambda x: runner.predict_outputs(x, self.output_names), self.data.batches(split))


def resolve(recipe, model) -> Task:
    """The recipe's loss/metric/budget applied to `model`'s outputs; every problem is one line."""
    names = list(model.output_names)
    metrics = _per_output(recipe.metric.name, names, "metric.name")
    shapes = model.output_shape if len(names) > 1 else [model.output_shape]
    units = [int(np.prod([d for d in s[1:] if d is not None])) for s in shapes]
    activations = [_activation(model, n) for n in names]
    losses = (_per_output(recipe.loss, names, "loss") if recipe.loss != "auto"
              else [_auto_loss(m, u, a) for m, u, a in zip(metrics, units, activations)])
    output = recipe.metric.output
    if isinstance(output, str):
        if output not in names:
            raise CompressorError(f"recipe metric.output '{output}' is not an output of the model ({', '.join(names)})")
        output = names.index(output)
    if not 0 <= output < len(names):
        raise CompressorError(f"recipe metric.output {output} is out of range: the model has {len(names)} outputs")
    task = Task(names, losses, metrics, output, recipe.metric.direction, 0.0, units, activations)
    _check_names(task)
    name = task.name
    if task.direction == "auto":
        task.direction = "higher" if name in HIGHER else "lower" if name in LOWER else None
        if task.direction is None:
            raise CompressorError(f"recipe metric '{name}': say whether higher or lower is better with "
                                  "metric.direction: higher | lower")
    budget = recipe.max_metric_drop
    if budget is None:
        if name not in ACCURACY:
            raise CompressorError(f"recipe metric '{name}' needs a budget in its own units: set max_metric_drop "
                                  "(max_accuracy_drop is for accuracy)")
        budget = recipe.max_accuracy_drop
    task.budget = float(budget)
    return task


def _auto_loss(metric: str, units: int, activation: str) -> str:
    """`loss: auto` for one output: from the metric, else class labels; a 1-unit sigmoid classifier
    takes 0/1 labels (binary crossentropy: sparse crossentropy over one unit knows only class 0)."""
    if ":" in metric:
        return SPARSE
    if metric in ACCURACY and units == 1 and activation == "sigmoid":
        return BINARY
    return LOSS_FOR_METRIC.get(metric, SPARSE)


def _first_sentence(exc: Exception) -> str:
    return str(exc).split(". ")[0][:120]


def _check_names(task: Task) -> None:
    """Build every output's metric and loss once: a wrong name fails here, before any work."""
    for i, (metric, loss) in enumerate(zip(task.metrics, task.losses)):
        try:
            task.new_metric(i)
        except (ValueError, TypeError) as exc:
            raise CompressorError(f"recipe metric '{metric}' is not a Keras metric ({_first_sentence(exc)}); use a "
                                  "Keras name such as accuracy, mae, mse, auc, or package.module:function") from exc
        try:
            Task._loss(loss, task.activations[i])
        except (ValueError, TypeError) as exc:
            raise CompressorError(f"recipe loss '{loss}' is not a Keras loss ({_first_sentence(exc)}); use a Keras "
                                  "name such as sparse_categorical_crossentropy, mae, mse, "
                                  "or package.module:function") from exc


def expects_class_labels(recipe) -> bool:
    """The recipe is plain top-1 classification, so labels can be checked as integer classes as soon
    as the data is read (before the model is loaded)."""
    if recipe is None:
        return True
    names = [recipe.metric.name] if isinstance(recipe.metric.name, str) else recipe.metric.name
    return recipe.loss in ("auto", SPARSE) and all(n in ACCURACY for n in names)


def context_task(ctx) -> Task:
    """The stage context's task, or top-1 accuracy under the recipe's accuracy budget when the stage
    runs outside the pipeline (tests, notebooks)."""
    if getattr(ctx, "task", None) is not None:
        return ctx.task
    task = default_task(0)
    task.budget, task.data = ctx.recipe.max_accuracy_drop, ctx.data
    return task


def default_task(num_outputs: int) -> Task:
    """Single-output top-1 classification over `num_outputs` classes: what the checks assume when no
    recipe is given (the API's `check_against_model(ds, shape, classes)`)."""
    return Task(["output"], [SPARSE], ["accuracy"], 0, "higher", 0.01, [int(num_outputs)], ["softmax"])
