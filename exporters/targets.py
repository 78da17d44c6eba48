"""The registry of runtime targets and file formats: the one place that knows them by name.

A target is what a recipe ships to (LiteRT float, LiteRT int8, onnxruntime float, onnxruntime
int8): which runtime runs it, which file format it writes, how it is exported, which Dense block
shape that runtime's sparse kernel executes, which int8 schemes are candidates, and which
fallbacks apply (each with its reason). A file format maps extensions to a runner, a weight
read-back and an `inspect` table, so `bench`, `inspect`, read-back and verification look a file up
here instead of testing its extension.

Factories are named as "module:attribute" and resolved on first use: looking up a target (the
recipe validates its names here) never imports TensorFlow or onnxruntime, and the modules the
registry points at may ask the registry for a file's format without an import cycle. A target is
one `TARGETS.register(Target(...))` (the same `Registry` pattern as stages, criteria and layer
handlers); the recipe's `targets:` names are read from it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from compressor.core import CompressorError, Registry, export_form

__all__ = [
    "FileFormat", "Target", "Scheme", "Fallback", "FORMATS", "known_format", "TARGETS", "NAMES", "RUNTIMES",
    "target", "format_for", "runtime_formats", "selected", "dense_block", "channel_multiple", "float_target",
    "extension_list",
]


def _resolve(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class FileFormat:
    """A file kind: how to run it (if a runtime does), read its weights back and inspect it."""

    name: str
    extensions: tuple[str, ...]
    runtime: str | None         # the runtime that executes it (None: not runnable, e.g. Keras)
    runner: str | None          # "module:Class(path, threads, resolver)"
    reader: str | None          # "module:function(path) -> list[StoredTensor]"
    inspector: str              # "module:function(path, load_keras) -> (rows, notes)"
    resolvers: tuple[str, ...] = ("default",)  # op resolvers the runner accepts, most preferred first
    untrusted: str | None = None  # "module:function(path, size, limit)": structure checks before any parser opens it

    def open_runner(self, path, threads: int = 1, resolver: str = "default"):
        if self.runner is None:
            raise CompressorError(f"'{path}' is a {self.name} file, which no runtime runs; "
                                  f"pass {extension_list(runnable=True)}")
        return _resolve(self.runner)(path, threads, resolver)

    def read_weights(self, path) -> list:
        if self.reader is None:
            raise CompressorError(f"{path}: weights of a {self.name} file are not read back; "
                                  f"pass {extension_list(runnable=True)}")
        return _resolve(self.reader)(path)

    def check_untrusted(self, path, size: int, limit: int) -> None:
        """Structure checks (exporters/untrusted.py) for a file from elsewhere, before anything parses it."""
        if self.untrusted is not None:
            _resolve(self.untrusted)(path, size, limit)

    def inspect_rows(self, path, load_keras=None):
        """(rows, notes); `load_keras(path) -> model` is the caller's safe loader, for Keras files."""
        return _resolve(self.inspector)(path, load_keras)


@dataclass(frozen=True)
class Scheme:
    """One way to write a target's file; int8 schemes are measured against each other per model."""

    name: str
    description: str
    options: dict = field(default_factory=dict)  # passed to the exporter
    kind: str = "post-training"  # | "dynamic": float activations | "qat": from a quantization-aware fine-tune
    exporter: str | None = None  # "module:function", instead of the target's own


@dataclass(frozen=True)
class Fallback:
    """What is written instead when the preferred form cannot be used, and why."""

    when: str
    instead: str
    reason: str


@dataclass(frozen=True)
class Target:
    """One thing a recipe ships to: a runtime, float or int8, and everything needed to write its file."""

    name: str
    runtime: str
    format: FileFormat
    int8: bool
    exporter: str                  # "module:function(model, path, calibration, scheme, sparse) -> Path"
    dense_block: tuple[int, int]   # (in, out) block of Dense-kernel zeros the runtime's sparse kernel executes
    schemes: tuple[Scheme, ...]
    fallbacks: tuple[Fallback, ...] = ()
    storage_flag: str | None = None  # recipe field that can switch compact storage of pruned weights off
    channel_block: str = "exporters.targets:xnnpack_channel_block"  # "module:function() -> int"

    @property
    def extension(self) -> str:
        return self.format.extensions[0]

    def filename(self, variant: str) -> str:
        return f"{variant}{self.extension}"

    def export(self, model, path, *, calibration=None, scheme: Scheme | None = None, sparse: bool = True):
        """Write `model` for this target; `sparse` asks for compact storage of pruned weights. Every
        converter gets the model's export form (static shapes but the batch; compressor.core.export_form)."""
        scheme = scheme or self.schemes[0]
        return _resolve(scheme.exporter or self.exporter)(export_form(model), path, calibration=calibration,
                                                          sparse=sparse, **scheme.options)

    def fallback(self, when: str) -> Fallback | None:
        """The registry's fallback for `when`, or None where this target names none."""
        return next((f for f in self.fallbacks if f.when == when), None)

    def open_runner(self, path, threads: int = 1, resolver: str = "default"):
        return self.format.open_runner(path, threads, resolver)


TFLITE = FileFormat("tflite", (".tflite",), "tflite", "exporters.runtimes:TFLiteRunner",
                    "exporters.readback:tflite_weights", "exporters.inspect:tflite_rows",
                    resolvers=("default", "builtin"), untrusted="exporters.untrusted:check_tflite")
ONNX = FileFormat("onnx", (".onnx",), "onnxruntime", "exporters.runtimes:OnnxRunner",
                  "exporters.readback:onnx_weights", "exporters.inspect:onnx_rows",
                  untrusted="exporters.untrusted:check_onnx")
KERAS = FileFormat("keras", (".keras", ".h5", ".hdf5"), None, None, None, "exporters.inspect:keras_rows")
FORMATS = (TFLITE, ONNX, KERAS)

_MISALIGNED = Fallback(
    "misaligned", "dense storage",
    "the converter's block encoding drops the trailing partial block of a Dense kernel whose input width is not "
    "a multiple of the block height, so such a model is written with dense storage")
_XNNPACK_SPARSE_INT8 = Fallback(
    "delegate-rejects-sparse", "dense int8 storage",
    "the default XNNPACK delegate rejects int8 sparse tensors it has no kernel for (conv kernels, blocks other "
    "than 16x1) and the default interpreter would fail to run the file; dense int8 storage still keeps the "
    "zeros, gzip shrinks them")

# tried only when every post-training full-integer scheme misses the budget (exporters/candidates.py)
_QAT_TFLITE = Scheme("qat", "quantization-aware fine-tune (tfmot, pruning-preserving), then full-integer int8 "
                     "weights and activations, sparse storage of pruned tensors", {"encode": True}, kind="qat",
                     exporter="exporters.qat:export_tflite")
_QAT_ONNX = Scheme("qat", "quantization-aware fine-tune (tfmot, pruning-preserving), written as QDQ with the "
                   "fine-tune's int8 ranges", kind="qat", exporter="exporters.qat:export_onnx")

TARGETS: Registry[Target] = Registry("target")
TARGETS.register(Target("tflite", "tflite", TFLITE, False, "exporters.tflite_export:export_for_target", (4, 1),
                    (Scheme("float32", "float32 weights; pruned tensors block-sparse encoded"),),
                    (_MISALIGNED,)))
TARGETS.register(Target("tflite-int8", "tflite", TFLITE, True, "exporters.tflite_export:export_for_target", (16, 1),
                    (Scheme("int8-sparse", "full-integer int8, per-channel weights, sparse storage of pruned tensors",
                            {"int8": True, "encode": True}),
                     Scheme("int8-dense", "full-integer int8, per-channel weights, dense storage",
                            {"int8": True, "encode": False}),
                     _QAT_TFLITE,
                     Scheme("dynamic-range", "int8 weights, float activations quantized at run time (for models whose "
                            "activations full-integer int8 loses accuracy on), sparse storage of pruned tensors",
                            {"dynamic": True, "encode": True}, kind="dynamic")),
                    (_MISALIGNED, _XNNPACK_SPARSE_INT8)))
TARGETS.register(Target("onnxruntime", "onnxruntime", ONNX, False, "exporters.onnx_export:export_for_target", (1, 1),
                    (Scheme("float32", "float32 weights; pruned initializers as sparse_initializer when compact"),),
                    storage_flag="compact_onnx", channel_block="exporters.targets:nchwc_channel_block"))
TARGETS.register(Target("onnxruntime-int8", "onnxruntime", ONNX, True, "exporters.onnx_export:export_for_target",
                        (1, 1),
                    (Scheme("qdq-per-channel", "static QDQ int8 end to end (uint8 activations on x86, int8 on ARM: "
                            "what onnxruntime's int8 kernels fuse), per-channel int8 weights, min-max ranges "
                            "(reduce_range on x86 CPUs without VNNI)", {"mode": "static"}),
                     Scheme("qdq-per-tensor", "the same with one weight scale per tensor (faster pointwise convs; less "
                            "accurate where folded BatchNorm scales differ by channel)",
                            {"mode": "static", "per_channel": False}),
                     Scheme("qdq-per-channel-percentile", "the same with 99.999th-percentile activation ranges "
                            "(outliers clipped: for models min-max int8 loses accuracy on)",
                            {"mode": "static", "calibrate": "percentile"}),
                     _QAT_ONNX,
                     Scheme("dynamic", "dynamic quantization: per-tensor int8 weights, activations scaled at run time "
                            "(tiny MatMuls left float)", {"mode": "dynamic"}, kind="dynamic")),
                    channel_block="exporters.targets:nchwc_channel_block"))
NAMES: tuple[str, ...] = tuple(TARGETS)
RUNTIMES: tuple[str, ...] = tuple(dict.fromkeys(t.runtime for t in TARGETS.values()))


def target(name: str) -> Target:
    return TARGETS.lookup(name)


def selected(names) -> list[Target]:
    """The recipe's targets, in registry order."""
    return [t for t in TARGETS.values() if t.name in set(names)]


def runtime_formats(names) -> list[tuple[str, FileFormat]]:
    """(runtime, file format) of every runtime the targets use: each gets dense and pruned float files."""
    seen = {}
    for t in selected(names):
        seen.setdefault(t.runtime, t.format)
    return list(seen.items())


def float_target(runtime: str) -> Target:
    return next(t for t in TARGETS.values() if t.runtime == runtime and not t.int8)


def dense_block(names) -> tuple[int, int]:
    """The (in, out) Dense block that every selected target's sparse kernel can execute: the tallest."""
    blocks = [t.dense_block for t in selected(names)]
    return max(blocks, key=lambda b: b[0] * b[1]) if blocks else (1, 1)


def xnnpack_channel_block() -> int:
    """XNNPACK's f32 kernels tile output channels by 8 on x86 and ARM; narrower tails cost little more."""
    return 8


def nchwc_channel_block() -> int:
    """onnxruntime runs convolutions in its blocked NCHWc layout only when channels are a multiple of
    the block (16 on AVX-512 CPUs, 8 otherwise); a narrower or odd width leaves the layout with a
    reorder on each side, which made a width-8 MobileNet chain slower than the same chain at 16."""
    from exporters.cpu import cpu_flags

    return 16 if "avx512f" in cpu_flags() else 8


def channel_multiple(names) -> int:
    """The width multiple every selected target's CPU kernels run at full speed: the largest block."""
    return max((_resolve(t.channel_block)() for t in selected(names)), default=8)


def extension_list(runnable: bool = False) -> str:
    exts = [e for f in FORMATS if f.runner or not runnable for e in f.extensions[:1]]
    return ", ".join(f"a {e}" for e in exts[:-1]) + f" or a {exts[-1]} file" if len(exts) > 1 else f"a {exts[0]} file"


def known_format(path, runnable: bool = False) -> FileFormat | None:
    """The file format of `path` by its extension, or None."""
    ext = Path(path).suffix.lower()
    return next((fmt for fmt in FORMATS if ext in fmt.extensions and (fmt.runner or not runnable)), None)


def format_for(path, runnable: bool = False, flag: str | None = None) -> FileFormat:
    """The file format of `path` by its extension; a one-line error naming the accepted ones."""
    fmt = known_format(path, runnable)
    if fmt is not None:
        return fmt
    ext = Path(path).suffix.lower()
    where = f"{flag} '{path}'" if flag else f"'{path}'"
    raise CompressorError(f"{where}: unknown extension {ext or '(none)'!r}: unknown file type; "
                          f"pass {extension_list(runnable)}")

