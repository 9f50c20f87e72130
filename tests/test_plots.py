"""The sample figures a reader looks at: units on every axis, the activity of each real window,
and a figure of generated windows that says they are not paired with the real ones beside them."""
from __future__ import annotations

import numpy as np
import pytest

from flowfm_fast import plots


def test_channel_labels_carry_units():
    assert plots.channel_label("acc-x") == "acc-x [g]"
    assert plots.channel_label("gyro-z") == "gyro-z [rad/s]"
    assert plots.channel_label("ch0") == "ch0"  # user data: units unknown, none invented


def test_figure_has_units_titles_and_note(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seen = {}
    real_close = plt.close

    def keep(fig=None):  # read the figure back before plot_windows closes it
        seen["fig"] = fig
        real_close(fig)
    monkeypatch.setattr(plt, "close", keep)
    rng = np.random.default_rng(0)
    rows = {"real": rng.normal(size=(3, 3, 300)), "generated": rng.normal(size=(3, 3, 300))}
    out = plots.plot_windows(tmp_path / "g.png", rows, ("acc-x", "acc-y", "acc-z"),
                             titles=["real: walking", "real: sitting", "real: laying"], note="not paired")
    assert out.is_file() and out.stat().st_size > 1000
    fig = seen["fig"]
    axes = np.array(fig.axes).reshape(3, 3)
    assert [axes[c, 0].get_ylabel() for c in range(3)] == ["acc-x [g]", "acc-y [g]", "acc-z [g]"]
    assert all(axes[2, j].get_xlabel() == "time [s]" for j in range(3))
    assert [axes[0, j].get_title() for j in range(3)] == ["real: walking", "real: sitting", "real: laying"]
    assert fig._suptitle is not None and fig._suptitle.get_text() == "not paired"


def test_sample_figures_name_activities_and_say_generated_is_unpaired(tmp_path, monkeypatch):
    from flowfm_fast.datasets import load_bundle
    from flowfm_fast.eval import samples
    from flowfm_fast.models import get_config
    from flowfm_fast.train import build_model
    calls = []
    monkeypatch.setattr(samples, "plot_windows", lambda path, rows, channels, **kw: calls.append((path, kw)) or path)
    bundle = load_bundle("synthetic")
    model = build_model(get_config("tiny"), 0).eval()
    samples.sample_and_plot(model, bundle, tmp_path / "s.npz", n=3, steps=2, method="euler", seed=0)
    (recon_path, recon_kw), (gen_path, gen_kw) = calls
    picked = samples.spread_indices(bundle.test.y, 3, len(bundle.test))
    want = [f"real: {bundle.classes[int(y)]}" for y in bundle.test.y[picked]]
    assert recon_kw["titles"] == gen_kw["titles"] == want
    assert "NOT paired" in gen_kw["note"] and "NOT paired" not in recon_kw["note"]
    assert gen_path.name == "s_generated.png"


def test_label_efficiency_plot_axes(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seen = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (seen.setdefault("fig", fig), real_close(fig)))
    curves = {"pretrained": {1: [0.5, 0.6], 10: [0.8, 0.85], 237: [0.9]},
              "random-init": {1: [0.3, 0.4], 10: [0.6, 0.62], 237: [0.86]}}
    out = plots.plot_label_efficiency(tmp_path / "le.png", curves)
    assert out.is_file()
    ax = seen["fig"].axes[0]
    assert ax.get_xscale() == "log" and "per class" in ax.get_xlabel() and ax.get_ylabel() == "macro-F1"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pretrained", "random-init"]
