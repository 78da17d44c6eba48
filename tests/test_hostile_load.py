"""Loading a hostile model file or recipe never writes or reads outside it and never exhausts the
machine: each case ends in one short `error:` line, in seconds, with nothing written."""
import os
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from compressor.core.errors import CompressorError

ROOT = Path(__file__).resolve().parents[1]
FAST = {"targets": ["tflite"], "max_accuracy_drop": 0.5, "stages": [{"name": "weight", "sparsity": 0.5, "epochs": 1}],
        "bench": {"runs": 200, "warmup": 1, "batch": [1], "threads": [1]}}


def _cli(*argv, timeout=120, env=None):
    """`compressor ...` in a fresh process, as a user runs it: (exit code, error lines, stderr, seconds)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", *map(str, argv)], check=False,
                          capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return proc.returncode, errors, proc.stderr, time.monotonic() - start


def _one_short_error(code, errors, err, needle):
    assert code == 1 and len(errors) == 1, err[-3000:]
    assert needle in errors[0] and len(errors[0]) < 300 and "Traceback" not in err, errors[0]


def _tiny():
    from compressor.core._tf import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax", name="d")])


def _recipe(folder: Path, raw=None) -> Path:
    path = folder / "fast.yaml"
    path.write_text(yaml.safe_dump(raw or FAST))
    return path


# --------------------------------------------------------------------------- SavedModel graph ops


def _printing_savedmodel(path: Path, marker: Path) -> None:
    """A tf-keras SavedModel with a tracked resource whose initializer prints into `marker`."""
    import tensorflow as tf

    class Planted(tf.saved_model.experimental.TrackableResource):
        def _create_resource(self):
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name=f"planted_{id(self)}")

        def _initialize(self):
            tf.print("written by the model file", output_stream=f"file://{marker}")
            return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=tf.constant(1.0))

    model = _tiny()
    model.planted = Planted()
    model.save(path, save_format="tf")


def test_savedmodel_printing_to_a_file_is_refused_and_no_file_appears(tmp_path):
    marker = tmp_path / "WRITTEN_BY_LOAD"
    _printing_savedmodel(tmp_path / "sm", marker)
    assert not marker.exists()
    code, errors, err, _ = _cli("run", "--model", tmp_path / "sm", "--data", "digits", "--out", tmp_path / "o",
                                "--recipe", _recipe(tmp_path), "--quiet")
    _one_short_error(code, errors, err, "'PrintV2'")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_ordinary_savedmodels_pass_the_graph_allow_list(tmp_path):
    """Layers of every family, compiled and trained or not, as tf-keras writes them."""
    from compressor.core._tf import keras
    from compressor.load.safety import check_savedmodel

    layers = keras.layers
    text = keras.Input((6,))
    attended = layers.MultiHeadAttention(2, 4)(layers.Embedding(20, 8)(text), layers.Embedding(20, 8)(text))
    models = {
        "cnn": keras.Sequential([keras.Input((12, 12, 3)), layers.Conv2D(4, 3), layers.BatchNormalization(),
                                 layers.DepthwiseConv2D(3, padding="same"), layers.MaxPooling2D(), layers.Dropout(0.2),
                                 layers.GlobalAveragePooling2D(), layers.Dense(3, activation="softmax")]),
        "rnn": keras.Sequential([keras.Input((5, 4)), layers.LSTM(4), layers.Dense(2)]),
        "text": keras.Model(text, layers.Dense(2)(layers.GlobalAveragePooling1D()(
            layers.LayerNormalization()(attended)))),
    }
    for name, model in models.items():
        if name == "cnn":  # compiled and trained: optimizer slots and metrics are saved too
            model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
            model.fit(np.random.rand(4, *model.input_shape[1:]), np.zeros(4), epochs=1, verbose=0)
        model.save(tmp_path / name, save_format="tf")
        check_savedmodel(tmp_path / name, name)


def test_savedmodel_checkpoint_ops_outside_the_saver_are_refused(tmp_path):
    """SaveV2 is allowed only in the save function the saver_def names, never in a model function."""
    from tensorflow.core.protobuf import saved_model_pb2

    from compressor.load.safety import check_savedmodel

    _tiny().save(tmp_path / "sm", save_format="tf")
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((tmp_path / "sm" / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0]
    forward = next(f for f in graph.graph_def.library.function if "wrapped_model" in f.signature.name)
    forward.node_def.add(name="planted", op="SaveV2")
    (tmp_path / "sm" / "saved_model.pb").write_bytes(proto.SerializeToString())
    with pytest.raises(CompressorError, match="'SaveV2'"):
        check_savedmodel(tmp_path / "sm", "sm")


def test_savedmodel_file_linked_to_elsewhere_is_refused(tmp_path):
    from compressor.load.model_io import load_model

    _tiny().save(tmp_path / "sm", save_format="tf")
    data = next((tmp_path / "sm" / "variables").glob("variables.data-*"))
    os.replace(data, tmp_path / "elsewhere.bin")
    data.symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(CompressorError, match="link to a file outside the SavedModel folder"):
        load_model(tmp_path / "sm")


# --------------------------------------------------------------------------- HDF5 reading outside the file


SECRET = np.frombuffer(b"TOP-SECRET-BYTES" * 160, np.float32)  # 2,560 bytes = the 64x10 float32 kernel


def _rewrite_h5(src: Path, dst: Path, kernel) -> None:
    """Copy an HDF5 file, replacing the Dense kernel dataset by what `kernel(group, name)` makes."""
    with h5py.File(src, "r") as old, h5py.File(dst, "w") as new:
        for key, value in old.attrs.items():
            new.attrs[key] = value

        def copy(name, obj):
            if isinstance(obj, h5py.Group):
                group = new.require_group(name)
                for key, value in obj.attrs.items():
                    group.attrs[key] = value
            elif name.endswith("kernel:0"):
                kernel(new.require_group(name.rpartition("/")[0]), name.rpartition("/")[2], obj)
            else:
                new.create_dataset(name, data=obj[()])
        old.visititems(copy)


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET.tobytes())
    return path


def test_h5_kernel_in_external_storage_is_refused_and_never_read(tmp_path, secret_file):
    _tiny().save(tmp_path / "plain.h5")
    _rewrite_h5(tmp_path / "plain.h5", tmp_path / "ext.h5", lambda group, name, obj: group.create_dataset(
        name, shape=obj.shape, dtype=obj.dtype, external=[(str(secret_file), 0, SECRET.nbytes)]))
    with h5py.File(tmp_path / "ext.h5") as f:  # the trick works: h5py reads the secret through the model
        assert f["model_weights/d/d/kernel:0"][()].tobytes() == SECRET.tobytes()
    out = tmp_path / "o"
    code, errors, err, _ = _cli("run", "--model", tmp_path / "ext.h5", "--data", "digits", "--out", out,
                                "--recipe", _recipe(tmp_path), "--quiet")
    _one_short_error(code, errors, err, "stores its bytes in another file")
    assert not out.exists()
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p != secret_file and b"TOP-SECRET" in p.read_bytes()]
    assert not leaked


def test_h5_external_links_and_virtual_datasets_are_refused(tmp_path, secret_file):
    from compressor.load.model_io import load_model

    _tiny().save(tmp_path / "plain.h5")
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other.create_dataset("kernel", data=SECRET.reshape(64, 10))

    def linked(group, name, obj):
        group[name] = h5py.ExternalLink(str(tmp_path / "other.h5"), "kernel")

    def virtual(group, name, obj):
        layout = h5py.VirtualLayout(shape=obj.shape, dtype=obj.dtype)
        layout[:] = h5py.VirtualSource(str(tmp_path / "other.h5"), "kernel", shape=obj.shape)
        group.create_virtual_dataset(name, layout)

    for kind, make, needle in (("link", linked, "is a link into the file"), ("vds", virtual, "virtual dataset")):
        _rewrite_h5(tmp_path / "plain.h5", tmp_path / f"{kind}.h5", make)
        with pytest.raises(CompressorError, match=needle) as caught:
            load_model(tmp_path / f"{kind}.h5")
        assert len(str(caught.value)) < 300


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_keras_archive_with_external_weight_storage_is_refused(tmp_path, secret_file, compression):
    _tiny().save(tmp_path / "plain.keras")
    with zipfile.ZipFile(tmp_path / "plain.keras") as src:
        (tmp_path / "w.h5").write_bytes(src.read("model.weights.h5"))
        members = {name: src.read(name) for name in src.namelist() if name != "model.weights.h5"}

    def external(group, name, obj):
        group.create_dataset(name, shape=obj.shape, dtype=obj.dtype, external=[(str(secret_file), 0, SECRET.nbytes)])

    with h5py.File(tmp_path / "w.h5") as f:  # tf-keras .keras weights: layers/<name>/vars/0
        kernel = f["layers/dense/vars/0"]
        shape, dtype = kernel.shape, kernel.dtype
    with h5py.File(tmp_path / "w.h5", "a") as f:
        del f["layers/dense/vars/0"]
        external(f["layers/dense/vars"], "0", type("K", (), {"shape": shape, "dtype": dtype}))
    with zipfile.ZipFile(tmp_path / "ext.keras", "w", compression) as dst:
        for name, data in members.items():
            dst.writestr(name, data)
        dst.writestr("model.weights.h5", (tmp_path / "w.h5").read_bytes())
    commands = [["inspect", tmp_path / "ext.keras"]]
    if compression == zipfile.ZIP_STORED:  # as Keras writes it; the loader is the same for both commands
        commands.append(["run", "--model", tmp_path / "ext.keras", "--data", "digits", "--out", tmp_path / "o",
                         "--quiet", "--recipe", _recipe(tmp_path)])
    for argv in commands:
        _one_short_error(*_cli(*argv)[:3], "stores its bytes in another file")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- archive and config bombs


class _RepeatedBlock:
    """A deflate 'compressor' that answers every 16 MiB of zeros with one precomputed block."""

    def __init__(self, chunk: bytes):
        engine = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.block = engine.compress(chunk) + engine.flush(zlib.Z_FULL_FLUSH)

    def compress(self, _data):
        return self.block

    def flush(self):
        return zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def _zip_bomb(path: Path, model_dir: Path) -> None:
    """A real .keras (config, metadata) whose weights member inflates 2 MB into 2 GiB of zeros."""
    _tiny().save(model_dir / "plain.keras")
    chunk = bytes(16 << 20)
    with zipfile.ZipFile(model_dir / "plain.keras") as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in ("metadata.json", "config.json"):
            dst.writestr(name, src.read(name))
        with dst.open("model.weights.h5", "w", force_zip64=True) as member:
            member._compressor = _RepeatedBlock(chunk)
            for _ in range(128):
                member.write(chunk)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_keras_zip_bomb_is_refused_in_seconds_before_extraction(tmp_path):
    bomb = tmp_path / "bomb.keras"
    _zip_bomb(bomb, tmp_path)
    assert bomb.stat().st_size < 3 << 20 and zipfile.ZipFile(bomb).getinfo("model.weights.h5").file_size == 2 << 30
    temp = tmp_path / "temp"
    temp.mkdir()
    for argv in (["inspect", bomb], ["run", "--model", bomb, "--data", "digits", "--out", tmp_path / "o", "--quiet",
                                     "--recipe", _recipe(tmp_path)]):
        code, errors, err, seconds = _cli(*argv, timeout=90, env={"TMPDIR": str(temp)})
        _one_short_error(code, errors, err, "would expand to 2,147,")
        assert seconds < 45 and _folder_bytes(temp) < 1 << 20, (seconds, _folder_bytes(temp))
    assert not (tmp_path / "o").exists()


def _keras_with_config(path: Path, config: bytes, model_dir: Path) -> None:
    _tiny().save(model_dir / "plain.keras")
    with zipfile.ZipFile(model_dir / "plain.keras") as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, config if name == "config.json" else src.read(name))


@pytest.mark.parametrize("kind", ["deep", "wide"])
def test_keras_config_bombs_are_refused_in_seconds(tmp_path, kind):
    if kind == "deep":  # a million levels: json and the config walk would recurse that deep
        config = b'{"class_name": "Sequential", "config": {"layers": ' + b"[" * 10 ** 6 + b"]" * 10 ** 6 + b"}}"
        needle = "nested 1,000,002 levels deep"
    else:  # 40 MB of small objects just under the depth limit: gigabytes once parsed and walked
        unit = b"[" * 150 + b'{"class_name": "Dense", "config": {}}' + b"]" * 150
        config, needle = (b'{"class_name": "Sequential", "config": {"layers": [' + b",".join([unit] * 120_000)
                          + b"]}}"), "bytes (at most 16,777,216)"
    _keras_with_config(tmp_path / "bomb.keras", config, tmp_path)
    code, errors, err, seconds = _cli("inspect", tmp_path / "bomb.keras", timeout=60)
    _one_short_error(code, errors, err, needle)
    assert seconds < 30


def test_h5_config_nested_too_deep_is_refused(tmp_path):
    from compressor.load.model_io import load_model

    _tiny().save(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f.attrs["model_config"] = '{"class_name": "Sequential", "config": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(CompressorError, match="nested 5,001 levels deep"):
        load_model(tmp_path / "m.h5")


# --------------------------------------------------------------------------- recipes


def _billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\nstages: *a{levels}\n"


def test_yaml_alias_bomb_recipe_is_refused_in_seconds(tmp_path):
    from compressor.config.recipe import load_recipe

    (tmp_path / "bomb.yaml").write_text(_billion_laughs())
    start = time.monotonic()
    with pytest.raises(CompressorError, match="expands to more than 100,000 values") as caught:
        load_recipe(tmp_path / "bomb.yaml")
    assert time.monotonic() - start < 3 and len(str(caught.value)) < 300
    (tmp_path / "ok.yaml").write_text("base: &b {name: weight, epochs: 1}\nstages: [*b]\n")
    with pytest.raises(CompressorError, match="'base'"):  # small anchors still parse (then the unknown field)
        load_recipe(tmp_path / "ok.yaml")


def test_yaml_alias_bomb_through_the_cli(tmp_path):
    _tiny().save(tmp_path / "m.keras")
    (tmp_path / "bomb.yaml").write_text(_billion_laughs())
    code, errors, err, seconds = _cli("run", "--model", tmp_path / "m.keras", "--data", "digits", "--out",
                                      tmp_path / "o", "--recipe", tmp_path / "bomb.yaml", timeout=60)
    _one_short_error(code, errors, err, "YAML anchors")
    assert seconds < 30 and not (tmp_path / "o").exists()


def test_recipe_seed_above_32_bits_is_refused_at_validation():
    from compressor.config.recipe import parse_recipe

    assert parse_recipe({"seed": 2 ** 32 - 1}).seed == 2 ** 32 - 1
    with pytest.raises(CompressorError, match="'seed' = 4294967296: .*4294967295"):
        parse_recipe({"seed": 2 ** 32})


@pytest.mark.parametrize("field,name", [("loss", "os:system"), ("metric", "subprocess:call"),
                                        ("loss", "builtins:eval"), ("metric", "shutil.os:remove"),
                                        ("loss", "tensorflow.io:write_file")])
def test_recipe_code_names_in_the_standard_library_are_refused(field, name):
    from compressor.config.recipe import parse_recipe

    with pytest.raises(CompressorError, match=f"recipe field '{field}.*'{name}'") as caught:
        parse_recipe({field: name})
    assert len(str(caught.value)) < 300


def test_recipe_code_names_must_be_plain_functions_or_metric_classes(tmp_path, monkeypatch):
    from compressor.config.recipe import parse_recipe
    from compressor.config.task import resolve

    (tmp_path / "userlosses_hostile.py").write_text(
        "from shutil import rmtree\nimport tf_keras as keras\nnot_code = 3\n"
        "class Plain:\n    pass\n"
        "class Mine(keras.metrics.Mean):\n    pass\n"
        "def mine(y_true, y_pred):\n    return y_pred\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _tiny()
    for spec, needle in (("userlosses_hostile:rmtree", "function from 'shutil'"),
                         ("userlosses_hostile:not_code", "is a int"), ("userlosses_hostile:Plain", "is a type")):
        with pytest.raises(CompressorError, match=needle) as caught:
            resolve(parse_recipe({"loss": spec}), model)
        assert len(str(caught.value)) < 300
    assert resolve(parse_recipe({"loss": "userlosses_hostile:mine"}), model).losses == ["userlosses_hostile:mine"]
    task = resolve(parse_recipe({"metric": {"name": "userlosses_hostile:Mine", "direction": "higher"},
                                        "max_metric_drop": 0.1}), model)
    assert type(task.new_metric(0)).__name__ == "Mine"


def test_recipe_code_name_through_the_cli_is_one_line(tmp_path):
    _tiny().save(tmp_path / "m.keras")
    code, errors, err, _ = _cli("run", "--model", tmp_path / "m.keras", "--data", "digits", "--out", tmp_path / "o",
                                "--recipe", _recipe(tmp_path, {**FAST, "loss": "os:system",
                                                               "metric": {"name": "subprocess:call"}}))
    _one_short_error(code, errors, err, "standard library")
    assert not (tmp_path / "o").exists()
