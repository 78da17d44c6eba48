"""One small runner per runtime, so verification, accuracy and latency all run files the same way.

LiteRT: `ai_edge_litert.interpreter` (tf.lite.Interpreter is deprecated), default resolver
(XNNPACK) unless the file needs the builtin one. onnxruntime: fixed intra-op threads, sequential,
all graph optimisations, run through an IOBinding.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.core import CompressorError, inputs, quiet_stderr
from exporters import targets
from exporters.watchdog import beat

_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
               "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _ids(x: np.ndarray, dtype) -> np.ndarray:
    """Values of an integer input that is not quantized (token ids, indices): rounded, not scaled."""
    return np.rint(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x).astype(dtype)


def timing_input(runner, batch: int, seed: int = 0) -> np.ndarray:
    """Fixed-seed input to time a file on when no data is given: standard normal values for a float
    input; id 1 for an integer one (token ids), which every real vocabulary holds, where noise would
    index past an Embedding's table (latency does not depend on which ids are looked up). Not id 0:
    that is Keras' padding id (mask_zero), and a sequence of padding only makes a masked mean divide
    by zero (LiteRT's int8 DIV aborts on it)."""
    if isinstance(runner.input_shape, dict):  # several inputs: each as if it were the only one
        rng = np.random.default_rng(seed)
        return {k: rng.standard_normal((batch, *s)).astype(np.float32) for k, s in runner.input_shape.items()}
    shape = (batch, *runner.input_shape)
    if runner.integer_input:
        return np.ones(shape, np.float32)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _probe(runner) -> np.ndarray:
    """One sample to try a file on: zeros, or ids 1 for token ids (ids 0 are all padding, see timing_input)."""
    if isinstance(runner.input_shape, dict):  # several inputs
        return inputs.zeros(runner.input_shape)
    return (np.ones if runner.integer_input else np.zeros)((1, *runner.input_shape), np.float32)


class TFLiteRunner:
    runtime = "tflite"

    def __init__(self, path: str | Path, threads: int = 1, resolver: str = "default"):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        kind = OpResolverType.AUTO if resolver == "default" else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.path, self.threads, self.resolver = Path(path), threads, resolver
        try:
            with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                               experimental_op_resolver_type=kind)
        except (ValueError, RuntimeError) as exc:
            raise CompressorError(
                f"LiteRT cannot load '{path}': {str(exc).splitlines()[0]}; is it a .tflite file?") from exc
        self._input = self.interpreter.get_input_details()[0]
        self._inputs = self._named_inputs()
        details = self.interpreter.get_output_details()
        self._output = details[0]
        # the converter lists outputs sorted by name; the signature maps each Keras output name to its tensor
        by_index = {d["index"]: d for d in details}
        try:
            named = next(iter(self.interpreter._get_full_signature_list().values()))["outputs"]
        except (StopIteration, KeyError, AttributeError):
            named = {}
        self.outputs = {n: by_index[i] for n, i in named.items() if i in by_index} or {d["name"]: d for d in details}
        self._batch = None

    def _named_inputs(self) -> dict:
        """Input details by Keras input name (the signature's), when the file has several inputs."""
        details = self.interpreter.get_input_details()
        if len(details) == 1:
            return {}
        by_index = {d["index"]: d for d in details}
        try:
            named = next(iter(self.interpreter._get_full_signature_list().values()))["inputs"]
        except (StopIteration, KeyError, AttributeError):
            named = {}
        return {n: by_index[i] for n, i in named.items() if i in by_index} or {d["name"]: d for d in details}

    @property
    def input_shape(self):
        """Per-sample input shape; {input name: shape} for a file with several inputs."""
        if self._inputs:
            return {n: tuple(int(v) for v in d["shape"][1:]) for n, d in self._inputs.items()}
        return tuple(int(d) for d in self._input["shape"][1:])

    def _prepare(self, batch: int) -> None:
        if batch != self._batch:
            for d in self._inputs.values() or [self._input]:
                self.interpreter.resize_tensor_input(d["index"], [batch, *(int(v) for v in d["shape"][1:])])
            with quiet_stderr():
                self.interpreter.allocate_tensors()
            self._batch = batch

    @property
    def integer_input(self) -> bool:
        """An integer input that is not quantized: token ids or indices (a quantized one has a scale)."""
        return self._input["dtype"] != np.float32 and not self._input["quantization"][0]

    def _encode(self, x: np.ndarray, detail: dict | None = None) -> np.ndarray:
        detail = detail or self._input
        dtype = detail["dtype"]
        if dtype == np.float32:
            return np.asarray(x, np.float32)  # set_tensor copies it
        if not detail["quantization"][0]:  # token ids or indices
            return _ids(x, dtype)
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def _decode(self, y: np.ndarray, detail: dict | None = None) -> np.ndarray:
        if y.dtype == np.float32:
            return y
        scale, zero = (detail or self._output)["quantization"]
        return (y.astype(np.float32) - zero) * scale

    def set_input(self, x: np.ndarray) -> None:
        beat(self.path)  # the next call starts (outside the timed region): exporters.watchdog
        self._prepare(inputs.count(x))
        if not inputs.is_multi(x):
            self.interpreter.set_tensor(self._input["index"], self._encode(x))
            return
        for name, detail in self._inputs.items():
            self.interpreter.set_tensor(detail["index"], self._encode(x[name], detail))

    def invoke(self) -> None:
        self.interpreter.invoke()

    def output(self) -> np.ndarray:
        return self._decode(self.interpreter.get_tensor(self._output["index"]))

    def serve(self, x: np.ndarray) -> np.ndarray:
        """One request as a Python server handles it: set_tensor (a copy in), invoke, get_tensor (a
        copy out). The batch must be the one set last (the timing loop's)."""
        if inputs.is_multi(x):
            for name, detail in self._inputs.items():
                self.interpreter.set_tensor(detail["index"], self._encode(x[name], detail))
        else:
            self.interpreter.set_tensor(self._input["index"], self._encode(x))
        self.interpreter.invoke()
        return self._decode(self.interpreter.get_tensor(self._output["index"]))

    def predict(self, x: np.ndarray, batch: int = 64) -> np.ndarray:
        outs = []
        for start in range(0, inputs.count(x), batch):
            self.set_input(inputs.rows(x, slice(start, start + batch)))
            self.invoke()
            outs.append(self.output().copy())
        return np.concatenate(outs)

    def predict_outputs(self, x: np.ndarray, names: list[str] | None = None, batch: int = 64) -> list[np.ndarray]:
        """Every output, in the order of `names` (the Keras model's output names) when the file has them."""
        order = [self.outputs[n] for n in names] if names and all(n in self.outputs for n in names) \
            else list(self.outputs.values())
        parts = [[] for _ in order]
        for start in range(0, inputs.count(x), batch):
            self.set_input(inputs.rows(x, slice(start, start + batch)))
            self.invoke()
            for part, detail in zip(parts, order):
                part.append(self._decode(self.interpreter.get_tensor(detail["index"]), detail).copy())
        return [np.concatenate(p) for p in parts]

    def op_names(self) -> list[str]:
        self._prepare(self._batch or 1)
        return [op["op_name"] for op in self.interpreter._get_ops_details()]


class OnnxRunner:
    runtime = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1, resolver: str = "default"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # every fusion (QDQ -> QLinearConv, DynamicQuantizeMatMul, Conv+Relu): int8 is measured as it ships
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.path, self.threads, self.resolver = Path(path), threads, resolver
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CompressorError(f"onnxruntime cannot load '{path}': {str(exc).splitlines()[0][:200]}") from exc
        self._input = self.session.get_inputs()[0]
        self._all = self.session.get_inputs()  # named as the Keras inputs when there are several
        self._dtype = _ONNX_TYPES.get(self._input.type, np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]
        # bound once, outside the timed call (LiteRT's set_tensor is outside it too): invoke() times the
        # inference, not the Python binding's feed-dict conversion (~5 us a call, a third of a small model)
        self._binding = self.session.io_binding()
        self._x = None

    @property
    def input_shape(self):
        """Per-sample input shape; {input name: shape} for a file with several inputs."""
        shapes = {i.name: tuple(int(d) if isinstance(d, int) else 1 for d in i.shape[1:]) for i in self._all}
        return shapes if len(shapes) > 1 else shapes[self._input.name]

    @property
    def integer_input(self) -> bool:
        return self._dtype != np.float32

    def _typed(self, x: np.ndarray, node=None) -> np.ndarray:
        """x in the file's input type (token ids rounded to ids)."""
        dtype = self._dtype if node is None else _ONNX_TYPES.get(node.type, np.float32)
        return _ids(x, dtype) if dtype != np.float32 else np.asarray(x, np.float32)

    def _feed(self, x) -> dict:
        """{file input name: array}: one input, or every Keras input by name."""
        if not inputs.is_multi(x):
            return {self._input.name: self._typed(x)}
        return {i.name: np.ascontiguousarray(self._typed(x[i.name], i)) for i in self._all}

    def set_input(self, x: np.ndarray) -> None:
        beat(self.path)  # the next call starts (outside the timed region): exporters.watchdog
        if self._x is None or inputs.count(self._x) != inputs.count(x):  # outputs sized for another batch: rebind
            self._binding.clear_binding_outputs()
            for name in self.output_names:
                self._binding.bind_output(name, "cpu")
        # owned copies, kept alive: the binding points at their memory
        self._x = {k: np.array(v, order="C") for k, v in self._feed(x).items()}
        for name, value in self._x.items():
            self._binding.bind_cpu_input(name, value)

    def invoke(self) -> None:
        self.session.run_with_iobinding(self._binding)

    def serve(self, x: np.ndarray) -> list[np.ndarray]:
        """One request as a Python server handles it: `session.run` with a numpy feed, every output
        fetched as new numpy arrays (the feed-dict conversion and the output copies included)."""
        return self.session.run(None, self._feed(x))

    def output(self) -> np.ndarray:
        return np.array(self._binding.get_outputs()[0].numpy())  # a copy: the next run may reuse the buffer

    def predict(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        outs = []
        for start in range(0, inputs.count(x), batch):
            self.set_input(inputs.rows(x, slice(start, start + batch)))
            self.invoke()
            outs.append(self.output())
        return np.concatenate(outs)

    def predict_outputs(self, x: np.ndarray, names: list[str] | None = None, batch: int = 256) -> list[np.ndarray]:
        """Every output, in the order of `names` (the Keras model's output names) when the file has them."""
        order = [self.output_names.index(n) for n in names] if names and all(n in self.output_names for n in names) \
            else list(range(len(self.output_names)))
        parts = [[] for _ in order]
        for start in range(0, inputs.count(x), batch):
            beat(self.path)
            outs = self.session.run(None, self._feed(inputs.rows(x, slice(start, start + batch))))
            for part, i in zip(parts, order):
                part.append(outs[i])
        return [np.concatenate(p) for p in parts]


def open_runner(path: str | Path, threads: int = 1, resolver: str = "default"):
    """A runner for the file's format (looked up in the target registry)."""
    fmt = targets.format_for(path, runnable=True)
    if not Path(path).is_file():
        raise CompressorError(
            f"model file '{path}' not found; pass an existing {targets.extension_list(runnable=True)}")
    beat(path)
    return fmt.open_runner(path, threads, resolver)


def open_runner_safely(path: str | Path, threads: int = 1) -> tuple[object, str, str | None]:
    """Open a file as a user would; if the default op resolver rejects it, use the format's next one.

    int8 LiteRT files with a sparsity pattern XNNPACK cannot take crash the default interpreter.
    Returns (runner, resolver, note); the note is for the report.
    """
    fmt = targets.format_for(path, runnable=True)
    runner = open_runner(path, threads=threads)
    try:
        runner.predict(_probe(runner))
        return runner, "default", None
    except CompressorError:
        raise
    except Exception as exc:  # the delegate failure surfaces as RuntimeError or ValueError
        if len(fmt.resolvers) < 2:
            raise CompressorError(f"{fmt.runtime} cannot run '{path}': {str(exc).splitlines()[0][:200]}") from exc
        first = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
    fallback = fmt.resolvers[1]
    runner = open_runner(path, threads=threads, resolver=fallback)
    try:
        runner.predict(_probe(runner))
    except Exception as exc:
        raise CompressorError(f"{fmt.runtime} cannot run '{path}' ({str(exc).splitlines()[0][:160]}); "
                              "re-export it with `compressor run`") from exc
    note = (f"{Path(path).name}: the default XNNPACK delegate rejects it ({first}); "
            "it needs OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES and was measured with it")
    return runner, fallback, note
