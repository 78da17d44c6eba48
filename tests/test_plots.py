"""exporters.plots writes real PNGs atomically and plots the rows it should."""
import os

import pytest

from exporters import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(variant, runtime, p50, p90, batch=1, threads=1, acc=0.97, gz=50_000):
    return {"variant": variant, "runtime": runtime, "file": f"{variant}.{runtime}",
            "accuracy": acc,
            "latency_ms": {"p50": p50, "p90": p90, "p99": p90 * 1.2, "mean": p50, "runs": 100},
            "batch": batch, "threads": threads, "size_bytes": gz * 3, "gzip_bytes": gz,
            "params": 1000, "nonzero_params": 500, "flops": 10_000}


RESULTS = [
    _row("dense", "tflite", 0.40, 0.55, gz=300_000, acc=0.975),
    _row("dense", "onnxruntime", 0.30, 0.35, gz=310_000, acc=0.975),
    _row("pruned", "tflite", 0.25, 0.31, gz=60_000, acc=0.970),
    _row("pruned", "onnxruntime", 0.20, 0.22, gz=65_000, acc=0.970),
    _row("pruned", "tflite", 1.50, 1.90, batch=8, gz=60_000, acc=0.970),
    _row("pruned", "tflite", 0.15, 0.20, threads=2, gz=60_000, acc=0.970),
]

LAYERS = [
    {"layer": "fc1", "units_before": 256, "units_after": 128,
     "sparsity_before": 0.0, "sparsity_after": 0.8},
    {"layer": "fc2", "units_before": 128, "units_after": 64,
     "sparsity_before": 0.05, "sparsity_after": 0.75},
    {"layer": "out", "units_before": 10, "units_after": 10,
     "sparsity_before": 0.0, "sparsity_after": 0.5},
]


def _assert_png_only(folder, path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert sorted(os.listdir(folder)) == [path.name], "temp files left behind"


@pytest.mark.parametrize("func, data, name", [
    (plots.plot_latency, RESULTS, "latency.png"),
    (plots.plot_accuracy_vs_size, RESULTS, "accuracy_vs_size.png"),
    (plots.plot_layers, LAYERS, "layers.png"),
])
def test_writes_png_atomically(tmp_path, func, data, name):
    target = tmp_path / name
    out = func(data, target)
    assert out == target
    _assert_png_only(tmp_path, target)
    # Overwriting an existing file works and still leaves nothing else behind.
    target.write_bytes(b"old")
    func(data, str(target))  # str paths accepted
    _assert_png_only(tmp_path, target)


@pytest.mark.parametrize("func", [plots.plot_latency, plots.plot_accuracy_vs_size,
                                  plots.plot_layers])
def test_empty_input_still_writes_png(tmp_path, func):
    target = tmp_path / "sub" / "empty.png"  # parent folder is created
    func([], target)
    _assert_png_only(target.parent, target)


def test_failed_render_leaves_no_files(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(plots.Figure, "savefig", boom)
    target = tmp_path / "latency.png"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        plots.plot_latency(RESULTS, target)
    assert os.listdir(tmp_path) == ["latency.png"]
    assert target.read_bytes() == b"previous"  # old file untouched


def _capture(monkeypatch):
    figs = []

    def fake_save(fig, path):
        figs.append(fig)
        return path
    monkeypatch.setattr(plots, "_save", fake_save)
    return figs


def test_latency_defaults_to_batch1_thread1(monkeypatch):
    figs = _capture(monkeypatch)
    plots.plot_latency(RESULTS, "unused.png")
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["dense\ntflite", "dense\nonnxruntime", "pruned\ntflite",
                      "pruned\nonnxruntime"]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([0.40, 0.30, 0.25, 0.20])
    # p90 markers sit at the p90 values.
    p90 = [y for _, y in ax.collections[-1].get_offsets()]
    assert p90 == pytest.approx([0.55, 0.35, 0.31, 0.22])

    plots.plot_latency(RESULTS, "unused.png", batch=None, threads=None)
    assert len(figs[1].axes[0].patches) == len(RESULTS)


def test_accuracy_vs_size_one_point_per_variant_runtime(monkeypatch):
    figs = _capture(monkeypatch)
    plots.plot_accuracy_vs_size(RESULTS, "unused.png")
    ax = figs[0].axes[0]
    assert ax.get_xscale() == "log"
    xs = sorted(x for c in ax.collections for x, _ in c.get_offsets())
    assert xs == [60_000, 65_000, 300_000, 310_000]  # batch-8 / 2-thread duplicates dropped
    texts = {t.get_text() for t in ax.texts}
    assert {"dense/tflite", "pruned/onnxruntime"} <= texts


def test_layers_two_panels(monkeypatch):
    figs = _capture(monkeypatch)
    plots.plot_layers(LAYERS, "unused.png")
    ax_w, ax_s = figs[0].axes
    assert [p.get_height() for p in ax_w.patches] == [256, 128, 10, 128, 64, 10]
    assert [p.get_height() for p in ax_s.patches] == pytest.approx([0, 5, 0, 80, 75, 50])
