"""Fine-tuning on tf.distribute: the recipe's `distribute:` builds one strategy per process.

Every fine-tune goes through `training.fit`, which trains a copy built inside `scope()` (or the model
itself when it was built there: tfmot's pruning wrappers and sparse_opt's penalty must be) and copies
the weights back, so the rest of the pipeline (scoring, surgery, export) sees ordinary models.
Training is synchronous, so every worker holds the same weights after each fit and takes the same
decisions; only the chief writes the result (`is_chief`), the other workers stop after the stages.

Both the logical CPU devices and MultiWorkerMirroredStrategy's collective ops must be set up before
TensorFlow initialises its devices, so `configure` runs before a model is loaded.
"""
from __future__ import annotations

import contextlib
import json
import os

from compressor.core._tf import tf
from compressor.core.errors import CompressorError

_state: dict = {"strategy": None, "name": "none", "chief": True, "task": None}


def configure(cfg, batch_size: int) -> None:
    """Create the strategy the recipe asks for (or none) and make it the one `fit` uses."""
    _state.update(strategy=None, name="none", chief=True, task=None)
    if cfg is None or cfg.strategy == "none":
        return
    if cfg.strategy == "mirrored":
        strategy = _mirrored(cfg.devices)
    else:
        _state["task"] = _task_from_tf_config()
        strategy = _multi_worker()
        _state["chief"] = _chief(_state["task"])
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise CompressorError(f"batch_size {batch_size} does not split evenly over {replicas} replicas; "
                              f"set the recipe's batch_size to a multiple of {replicas}")
    _state.update(strategy=strategy, name=cfg.strategy)


def _mirrored(devices: int | None):
    """All local GPUs (or the first `devices`), else `devices` logical CPU devices (default 2)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if devices is not None and devices > len(gpus):
            raise CompressorError(f"distribute.devices = {devices} but only {len(gpus)} GPUs are visible; "
                                  f"lower devices or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
        names = [f"/gpu:{i}" for i in range(devices or len(gpus))]
        return tf.distribute.MirroredStrategy(names)
    wanted = devices or 2
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * wanted)
    except RuntimeError:  # TensorFlow already initialised its devices in this process
        have = len(tf.config.list_logical_devices("CPU"))
        if have != wanted:
            raise CompressorError(
                f"distribute: {wanted} CPU devices must be created before TensorFlow starts, but this process "
                f"already has {have}; run `compressor run` in a fresh process") from None
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(wanted)])


def _task_from_tf_config() -> dict:
    """TF_CONFIG checked up front, so a typo fails in one line instead of a hang or a gRPC trace."""
    raw = os.environ.get("TF_CONFIG")
    fix = ("set TF_CONFIG on every worker to JSON like "
           '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}')
    if not raw:
        raise CompressorError(f"distribute.strategy multi_worker needs the TF_CONFIG environment variable; {fix}")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CompressorError(f"TF_CONFIG is not valid JSON ({exc.msg}); {fix}") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise CompressorError(f"TF_CONFIG needs both 'cluster' and 'task'; {fix}")
    kind, index = task.get("type"), task.get("index")
    members = cluster.get(kind)
    if not isinstance(members, list) or not isinstance(index, int) or not 0 <= index < len(members):
        raise CompressorError(f"TF_CONFIG task {task!r} is not a member of its cluster {sorted(cluster)}; {fix}")
    return {"type": kind, "index": index, "has_chief": bool(cluster.get("chief")),
            "workers": sum(len(v) for k, v in cluster.items() if k in ("chief", "worker"))}


def _multi_worker():
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as exc:
        raise CompressorError(f"cannot start MultiWorkerMirroredStrategy ({str(exc).splitlines()[0]}); it must start "
                              "before TensorFlow runs anything: use `compressor run` in a fresh process") from None


def _chief(task: dict) -> bool:
    """The chief task if the cluster names one, else worker 0 (TF's convention)."""
    if task["has_chief"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def strategy():
    """The configured strategy, or None for plain single-device training."""
    return _state["strategy"]


def is_chief() -> bool:
    return _state["chief"]


def scope():
    """`with scope():` builds variables the strategy mirrors (no-op without a strategy)."""
    current = _state["strategy"]
    return current.scope() if current is not None else contextlib.nullcontext()


def built_in_scope(model) -> bool:
    """True when every variable of `model` belongs to the configured strategy."""
    current = _state["strategy"]
    return current is not None and all(current.extended.variable_created_in_scope(v) for v in model.variables)


def describe() -> dict:
    """What report.json records: the strategy, the replicas in sync and the workers."""
    current = _state["strategy"]
    if current is None:
        return {"strategy": "none", "replicas": 1, "workers": 1}
    task = _state["task"]
    return {"strategy": _state["name"], "replicas": int(current.num_replicas_in_sync),
            "workers": task["workers"] if task else 1,
            "devices": [str(d) for d in current.extended.worker_devices]}
