"""The recipe: which stages run in which order, for which runtime targets, under what accuracy budget.

Validated with pydantic before any work starts, so a typo fails in one line naming the field, the
value and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compressor import criteria
from compressor.core.errors import CompressorError
from compressor.core.registry import Registry
from compressor.load.bounds import refused_module
from exporters import targets as registry

Target = Literal[registry.NAMES]  # the runtime targets the registry knows (exporters/targets.py)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: The importance criteria a recipe may name: the registered ones (compressor/criteria).
CriterionName = Literal[criteria.CRITERIA.names()]
_CRITERIA_TEXT = " | ".join(criteria.CRITERIA)


def stage_name(config: type) -> str:
    """The name a stage's config class answers to (its `name` field's default)."""
    fields = getattr(config, "model_fields", None)
    return fields["name"].default if fields is not None else config.name


#: The stage configurations a recipe may list, by name: the recipe's stage union and its error text
#: are read from here; each stage's implementation registers against its class (compressor/stages).
STAGES: Registry[type[BaseModel]] = Registry("stage", key=stage_name)


@STAGES.register
class WeightStage(_Strict):
    """Magnitude pruning through tfmot with a polynomial-decay schedule, masks held while fine-tuning."""

    name: Literal["weight"] = "weight"
    sparsity: float = Field(0.9, gt=0.0, lt=1.0, description="final fraction of zero weights per pruned kernel")
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="sparsity at the start of the schedule")
    block: Literal["auto", "unstructured", "4x1", "16x1"] = Field(
        "auto", description="zero pattern on Dense kernels; auto = what the targets' kernels execute"
    )
    epochs: int = Field(6, ge=1, le=1000, description="fine-tuning epochs while the sparsity ramps up")
    prune_last_layer: bool = Field(
        False, description="also prune the classifier layer (costs accuracy for little size)")
    conv_zeros: bool = Field(False, description=(
        "also zero conv kernels: smaller files only, since LiteRT (XNNPACK on x86) and onnxruntime run them dense"))
    sequence_zeros: bool = Field(False, description=(
        "also zero Dense kernels applied per token (input rank >= 3): smaller files only, since LiteRT's sparse "
        "FULLY_CONNECTED kernel over a token sequence is slower than its dense one"))


@STAGES.register
class ActivationStage(_Strict):
    """Remove neurons/channels that are idle on calibration data (mean |activation| or APoZ)."""

    name: Literal["activation"] = "activation"
    criterion: CriterionName = Field(
        "mean_abs", description=f"unit score: {_CRITERIA_TEXT} (compressor/criteria)")
    threshold: float = Field(0.1, ge=0.0, le=1.0, description="tau_a: remove units whose normalised score is below")
    max_fraction: float = Field(0.5, ge=0.0, lt=1.0, description="never remove more than this fraction of a layer")
    compensate: bool = Field(
        True,
        description="fold each removed unit's mean activation into the next layer's bias (exact for constant units)",
    )
    epochs: int = Field(2, ge=0, le=1000, description="fine-tuning epochs after removal")


@STAGES.register
class ClusterStage(_Strict):
    """K-means on activation patterns: drop units of tiny clusters, merge redundant units of a cluster."""

    name: Literal["cluster"] = "cluster"
    clusters_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="K = this fraction of a layer's units (at least 2)"
    )
    min_cluster_size: float = Field(
        0.0, ge=0.0, lt=1.0, description="tau_k: drop clusters holding fewer than this fraction of the layer's units"
    )
    merge_distance: float = Field(
        0.05, ge=0.0, description="merge units whose normalised pattern distance to the kept unit is below this"
    )
    max_fraction: float = Field(0.5, ge=0.0, lt=1.0, description="never remove more than this fraction of a layer")
    n_init: int = Field(3, ge=1, le=100, description="K-means restarts (best inertia kept)")
    epochs: int = Field(2, ge=0, le=1000, description="fine-tuning epochs after merging")


@STAGES.register
class SparseOptStage(_Strict):
    """Group-lasso / BN-gamma L1 training that drives whole units to zero, then removes them."""

    name: Literal["sparse_opt"] = "sparse_opt"
    penalty: Literal["group_lasso", "bn_l1", "both"] = Field("both", description=(
        "sparsity-inducing penalty (BN undoes group lasso on conv kernels; both covers either)"))
    strength: float = Field(1e-2, gt=0.0, description="penalty weight added to the loss (per unit norm / |gamma|)")
    threshold: float = Field(
        0.05, ge=0.0, description="remove units whose group norm (relative to the layer max) is below")
    max_fraction: float = Field(0.7, ge=0.0, lt=1.0, description="never remove more than this fraction of a layer")
    epochs: int = Field(3, ge=1, le=1000, description="penalised training epochs")
    lr_scale: float = Field(
        10.0, gt=0.0, le=1000.0,
        description="penalised phase runs Adam at this multiple of the recipe's learning rate: an idle unit "
        "needs about |w|/lr steps to reach zero",
    )
    finetune_epochs: int = Field(2, ge=0, le=1000, description="fine-tuning epochs after removal")


@STAGES.register
class DepthStage(_Strict):
    """Remove whole residual blocks (the branch of an identity-skip Add), least important first."""

    name: Literal["depth"] = "depth"
    # 1.0: the accuracy budget decides how many blocks go, not a cap. Width pruning alone cannot reach
    # 3x on MobileNetV2 at 32x32 (every width cut to 1: 2.75x LiteRT, 1.71x onnxruntime, measured with
    # scripts/width_floor.py): per-operator cost dominates, so removing operators is the lever.
    max_fraction: float = Field(1.0, ge=0.0, le=1.0, description=(
        "remove at most this fraction of the removable residual blocks (scaled by the stage's amount); "
        "the accuracy budget decides within it"))
    step: int = Field(2, ge=1, le=100, description="blocks removed in the first step; each step is fine-tuned and "
                      "checked against the accuracy budget: one within it doubles the next step, one over it is "
                      "undone and retried with half as many")
    epochs: int = Field(2, ge=0, le=1000, description="fine-tuning epochs after each step")
    recover_epochs: int = Field(4, ge=0, le=1000, description=(
        "a step over the budget gets up to this many more epochs, one at a time while each improves the metric, "
        "before it is undone"))
    samples: int = Field(256, ge=16, le=100000, description="calibration samples the blocks are scored on")


class Goal(_Strict):
    """What the user wants: a speedup (or a latency) on one runtime; neither = the fastest within budget."""

    runtime: Literal["onnxruntime", "tflite"] = Field("onnxruntime", description="runtime the latency is measured on")
    speedup: float | None = Field(None, ge=1.0, le=1000.0, description="p50 speedup over the dense model (>= 1)")
    latency_ms: float | None = Field(None, gt=0.0, description="p50 latency target in milliseconds")
    batch: int = Field(1, ge=1, le=4096, description="batch size the latency is measured at")


@STAGES.register
class SearchStage(_Strict):
    """Per-layer widths chosen against latency measured on the runtime and the accuracy budget."""

    name: Literal["search"] = "search"
    goal: Goal = Field(default_factory=Goal, description="speed goal; no speedup/latency_ms = fastest within budget "
                       "on the targets' runtimes (runtime then only sets the table the allocation follows)")
    criterion: CriterionName = Field("taylor", description="unit importance, one of compressor/criteria's names")
    epochs: int = Field(2, ge=0, le=1000, description="fine-tuning epochs after each operating point")
    recover_epochs: int = Field(4, ge=0, le=1000, description=(
        "a point over the budget gets up to this many more epochs, one at a time while each improves the metric, "
        "before it counts as over"))
    points: list[float] = Field([2.0, 4.0, 8.0], min_length=0, description="frontier speedups (predicted) to visit")
    bisect: int = Field(2, ge=0, le=10, description="steps of bisection between the last good and first bad point")
    min_width: int | None = Field(None, ge=1, le=4096, description=(
        "narrowest width of a channel group (a group of 16 or more never below 8); default: round_units and at least "
        "8, down to 8 only where the latency table shows narrower is faster and it is no single-path bottleneck"))
    min_fraction: float = Field(0.0, ge=0.0, le=1.0, description="no group narrower than this fraction of its width")
    max_cut_fraction: float = Field(0.5, gt=0.0, le=0.95, description=(
        "largest fraction of a group's width one operating point may remove (later points may remove more)"))
    goal_margin: float = Field(0.1, ge=0.0, le=1.0, description=(
        "with a speed goal, a point ships only if its measured speed beats the goal by this fraction (room for the "
        "final benchmark's noise); the most accurate such point ships"))
    latency_cache: str | None = Field(None, description="JSON latency table to read and extend (default: per machine)")

    @field_validator("points")
    @classmethod
    def _above_one(cls, values: list[float]) -> list[float]:
        if any(v <= 1.0 for v in values):
            raise ValueError("every frontier speedup must be > 1")
        return sorted(values)


Stage = Annotated[Union[tuple(STAGES.values())], Field(discriminator="name")]


class BenchSettings(_Strict):
    """Timing of every exported file."""

    runs: int = Field(300, ge=200, le=100000, description="timed runs per file (at least 200)")
    warmup: int = Field(50, ge=1, le=10000, description="untimed runs first")
    block: int = Field(10, ge=1, le=1000, description="back-to-back calls per file per turn, the first untimed "
                       "(1: every call follows another file's, a cold-cache figure)")
    threads: list[int] = Field([1], min_length=1, description="thread counts to measure")
    batch: list[int] = Field([1, 32], min_length=1, description="batch sizes to measure")

    @field_validator("threads", "batch")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values):
            raise ValueError("every entry must be >= 1")
        return values


class MetricSpec(_Strict):
    """The quality measure the budget is counted in (one per output of a multi-output model)."""

    name: str | list[str] = Field("accuracy", description="Keras metric name (accuracy, mae, mse, auc, ...) or "
                                  "pkg.mod:func; a list gives one per model output")
    direction: Literal["auto", "higher", "lower"] = Field(
        "auto", description="higher or lower is better; auto knows the Keras names (pkg.mod:func must say)")
    output: int | str = Field(0, description="multi-output models: the output (index or name) the budget is counted on")

    @field_validator("name")
    @classmethod
    def _names(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("give at least one metric name")
        return _own_code(value)


def _own_code(value: str | list[str]) -> str | list[str]:
    """`pkg.mod:func` names code that runs: refused when it names the standard library or builtins."""
    for name in [value] if isinstance(value, str) else value:
        why = refused_module(name) if ":" in name else ""
        if why:
            raise ValueError(f"{why}; name a function of your own module")
    return value


class FeatureSpec(_Strict):
    """One feature of a TFRecord's tf.train.Example."""

    dtype: Literal["float32", "int64", "string"] = Field(description="float32 | int64 | string (encoded image bytes)")
    shape: list[int] = Field([], description="per-example shape; [] for a scalar")
    image: bool = Field(False, description="string feature holding PNG/JPEG bytes: decoded to the model's input")

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d < 1 for d in value):
            raise ValueError("every dimension must be >= 1")
        return value


class TFRecordSpec(_Strict):
    """Which Example features are the input and the label(s), and which files are which split."""

    x: str = Field("image", description="feature holding the model's input")
    y: str | list[str] = Field("label", description="feature holding the label (a list: one per model output)")
    features: dict[str, FeatureSpec] = Field(description="the features to parse: name -> {dtype, shape, image}")
    train: str = Field("*train*", description="file pattern (glob, relative to --data) of the training files")
    test: str = Field("*test*", description="test files; none found: every holdout-th record is held out for testing")
    validation: str = Field("*val*", description="validation files (optional): the budget is checked on them")
    calibration: str = Field("*calib*", description="calibration files (optional; default: the first training samples)")
    holdout: int = Field(5, ge=2, le=1000, description="without test files: 1 in this many records is test data")

    def model_post_init(self, _context) -> None:
        for name in [self.x] + ([self.y] if isinstance(self.y, str) else list(self.y)):
            if name not in self.features:
                raise ValueError(f"feature '{name}' is named as x/y but not listed under features "
                                 f"({', '.join(self.features) or 'none'})")


class DataSettings(_Strict):
    """How streamed data (image folders, TFRecord files, tf.data functions) is read."""

    rescale: float = Field(1 / 255, gt=0.0, description="image folders and decoded images: pixel values times this")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="image folder without train/ test/ sub-folders: "
                                 "this fraction of the images (fixed seed) is the test split")
    shuffle_buffer: int = Field(512, ge=1, le=1_000_000, description="samples held for shuffling a training stream")
    calibration_samples: int = Field(500, ge=1, le=100_000,
                                     description="samples the activity statistics and int8 calibration read")
    tfrecord: TFRecordSpec | None = Field(None, description="feature spec for --data FILES.tfrecord")


class Distribute(_Strict):
    """Where fine-tuning runs: one device (none), several local devices, or a cluster named by TF_CONFIG."""

    strategy: Literal["none", "mirrored", "multi_worker"] = Field(
        "none", description="none | mirrored (local GPUs, else CPU devices) | multi_worker (TF_CONFIG cluster)")
    devices: int | None = Field(None, ge=1, le=256, description=(
        "mirrored: replicas, the first N GPUs or without GPUs N logical CPU devices; null = all GPUs or 2 CPUs"))

    @model_validator(mode="after")
    def _devices_for_mirrored(self):
        if self.devices is not None and self.strategy != "mirrored":
            raise ValueError(f"devices applies to strategy mirrored only (strategy is {self.strategy}); remove devices")
        return self


class Distill(_Strict):
    """Distillation: every fine-tune also learns the dense model's softened outputs (classification outputs)."""

    enabled: bool = Field(False, description=(
        "teach every stage's and search point's fine-tune with the dense model (off: measured worse on the demo)"))
    alpha: float = Field(0.5, ge=0.0, le=1.0, description=(
        "weight of the KL term: loss = (1 - alpha) * task loss + alpha * T^2 * KL (regression outputs: task loss)"))
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="softening temperature T of teacher and student")


class Recipe(_Strict):
    """A whole compression run."""

    targets: list[Target] = Field(list(registry.NAMES), min_length=1,
                                  description="runtimes to ship to; they pick the sparsity pattern")
    stages: list[Stage] = Field(
        default_factory=lambda: [WeightStage(), DepthStage(), ActivationStage(), ClusterStage(), SparseOptStage(),
                                 SearchStage()],
        min_length=1,
        description="applied in this order; default: the source article's weight -> activation -> cluster with "
        "depth (residual blocks) before the width stages, then sparse_opt, then a search for the fastest widths "
        "within the budget",
    )
    max_accuracy_drop: float = Field(
        0.01, ge=0.0, le=1.0, description="accuracy budget, as a fraction (0.01 = 1 point)")
    loss: str | list[str] = Field("auto", description="fine-tuning loss: Keras name or pkg.mod:func, a list: one per "
                                  "output; auto: sparse categorical crossentropy (from the metric for mae/mse/auc)")
    metric: MetricSpec = Field(default_factory=MetricSpec)
    max_metric_drop: float | None = Field(None, ge=0.0, description="budget in the metric's units (how much worse it "
                                          "may get); default: max_accuracy_drop when the metric is accuracy")
    data: DataSettings = Field(default_factory=DataSettings)
    batch_size: int = Field(32, ge=1, le=65536, description="fine-tuning batch size")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="fine-tuning learning rate (Adam)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="makes masks and files reproducible (0 to 2**32 - 1)")
    round_units: int | Literal["auto"] = Field(
        "auto", description="keep widths narrowed by structured stages at a multiple of this: stages remove fewer "
        "units to get there (CPU kernels slow down on odd widths); auto: the channel block of the targets' kernels "
        "on this CPU (onnxruntime's blocked convolutions: 16 with AVX-512, else 8; LiteRT: 8)")
    keep_frontier: bool = Field(False, description="also write the search's other operating points' float files "
                                "to frontier/<point>/")
    compact_onnx: bool = Field(True, description="store pruned ONNX initializers as sparse_initializer")
    bench: BenchSettings = Field(default_factory=BenchSettings)
    distribute: Distribute = Field(default_factory=Distribute, description=(
        "fine-tune under tf.distribute; batch_size is the global batch, split over the replicas"))
    distill: Distill = Field(default_factory=Distill, description="distillation from the dense model")

    @field_validator("targets", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("loss")
    @classmethod
    def _loss_code(cls, value):
        return _own_code(value)

    @field_validator("round_units")
    @classmethod
    def _units_in_range(cls, value):
        if value != "auto" and not 1 <= value <= 256:
            raise ValueError("round_units must be 'auto' or between 1 and 256")
        return value

    def unit_multiple(self) -> int:
        """round_units as a number: 'auto' asks the target registry for this CPU's channel block."""
        return registry.channel_multiple(self.targets) if self.round_units == "auto" else self.round_units

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_shorthand(cls, value):
        return {"name": value} if isinstance(value, (str, list)) else value

    def dense_block(self) -> tuple[int, int]:
        """The (in, out) block on Dense kernels that the targets' sparse kernels execute (the registry's)."""
        weight = next((s for s in self.stages if isinstance(s, WeightStage)), None)
        choice = weight.block if weight else "auto"
        if choice == "unstructured":
            return (1, 1)
        if choice == "4x1":
            return (4, 1)
        if choice == "16x1":
            return (16, 1)
        return registry.dense_block(self.targets)


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"])[:80]
    value = repr(err.get("input"))
    value = value if len(value) <= 80 else f"{value[:76]} ..."
    msg = str(err["msg"]).removeprefix("Value error, ")[:160]
    if err["type"] == "union_tag_invalid" or "tag" in err["type"]:
        msg = f"unknown stage; allowed: {', '.join(STAGES)}"
    return f"recipe field '{where}' = {value}: {msg}"


def parse_recipe(raw: dict | None, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise CompressorError(f"invalid {source}: {_describe(first)}{suffix}") from exc


#: A recipe is a few dozen values: bounds on its file and on its YAML once anchors are expanded
#: (billion laughs: 9 aliases of 9 aliases ... expand to 9**9 values from a few hundred bytes).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000
MAX_RECIPE_DEPTH = 50


def _clip(path) -> str:
    text = str(path)
    return text if len(text) <= 80 else f"…{text[-79:]}"


def _safe_yaml(text: str, path):
    """yaml.safe_load, refusing before construction a document whose aliases expand past
    MAX_RECIPE_NODES values (counted once per node, shared subtrees by their expanded size)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, 0, path)
        if size > MAX_RECIPE_NODES:
            raise CompressorError(f"recipe '{_clip(path)}' expands to more than {MAX_RECIPE_NODES:,} values through "
                                  "its YAML anchors and aliases (a YAML bomb?); write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node, memo: dict, depth: int, path) -> int:
    if depth > MAX_RECIPE_DEPTH:
        raise CompressorError(f"recipe '{_clip(path)}' nests more than {MAX_RECIPE_DEPTH} levels; a recipe is a "
                              "shallow mapping (see `compressor recipe --example`)")
    if id(node) in memo:
        return memo[id(node)]
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
        node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1
    for child in children:
        total += _expanded_size(child, memo, depth + 1, path)
        if total > MAX_RECIPE_NODES:
            break
    memo[id(node)] = total
    return total


def load_recipe(path: str | Path | None) -> Recipe:
    """Read a YAML recipe; None gives the built-in default fusion recipe."""
    if path is None:
        return default_recipe()
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"recipe '{path}' not found; pass an existing YAML file or omit --recipe for the default")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise CompressorError(f"recipe '{_clip(path)}' is {size:,} bytes (at most {MAX_RECIPE_BYTES:,}); a recipe is "
                              "a short YAML file (see `compressor recipe --example`)")
    try:
        raw = _safe_yaml(path.read_text(errors="replace"), path)
    except (yaml.YAMLError, RecursionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise CompressorError(f"recipe '{_clip(path)}' is not valid YAML ({first}); check its indentation") from None
    if raw is not None and not isinstance(raw, dict):
        raise CompressorError(f"recipe '{path}' must be a mapping of fields (see `compressor recipe --example`)")
    return parse_recipe(raw, f"recipe '{_clip(path)}'")


def with_goal(recipe: Recipe, speedup: float | None = None, runtime: str | None = None) -> Recipe:
    """`--speedup X --runtime R`: the goal of the recipe's search stage, or a search stage appended
    after the others (they decide which units look idle; the search decides how much goes)."""
    update = {k: v for k, v in (("speedup", speedup), ("runtime", runtime)) if v is not None}
    if not update:
        return recipe
    stages = list(recipe.stages)
    index = next((i for i, s in enumerate(stages) if isinstance(s, SearchStage)), None)
    search = stages[index] if index is not None else SearchStage()
    raw = search.model_dump()
    raw["goal"].update(update)
    if index is None:
        stages.append(raw)
    else:
        stages[index] = raw
    return parse_recipe({**recipe.model_dump(),
                         "stages": [s if isinstance(s, dict) else s.model_dump() for s in stages]},
                        "command-line goal")


def default_recipe() -> Recipe:
    """The built-in fusion recipe: the source article's order weight -> activation -> cluster, then
    sparse-optimisation, then the search: the stages pick which units look idle and hold their zeros,
    the search (no speed goal) narrows further to the fastest point measured within the budget."""
    return Recipe()


def example_yaml() -> str:
    """The default recipe with a comment on every field (`compressor recipe --example`), generated
    from the schema's own defaults and field descriptions, so it cannot drift from what is parsed."""
    recipe = default_recipe()
    lines = ["# compressor recipe: stages run in this order, then the model is exported for every target."]
    sections = ("bench", "metric", "data", "distribute", "distill")
    lines += [_example_line(name, getattr(recipe, name), field.description, "")
              for name, field in Recipe.model_fields.items() if name not in ("stages", *sections)]
    lines.append("stages:")
    for stage in recipe.stages:
        fields = type(stage).model_fields
        lines += [_example_line(name, getattr(stage, name),
                                fields[name].description or type(stage).__doc__.split(".")[0],
                                "  - " if i == 0 else "    ") for i, name in enumerate(fields)]
    for section in sections:
        value = getattr(recipe, section)
        lines.append(f"{section}:{'':<{24 - len(section)}} # {type(value).__doc__.splitlines()[0]}")
        lines += [_example_line(name, getattr(value, name), field.description, "  ")
                  for name, field in type(value).model_fields.items()]
    return "\n".join(lines) + "\n"


def _example_line(name: str, value, description: str | None, indent: str) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump()  # nested settings (the search's goal) as a flow mapping
    text = yaml.safe_dump({name: value}, default_flow_style=True, width=200).strip()[1:-1]
    text = f"{indent}{text}"
    return f"{text:<25} # {description}" if description else text
