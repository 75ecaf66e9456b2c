"""bench/roofline.py without an engine: the probe, the prediction's arithmetic, the report.
(The measured side runs vLLM; `python -m bench.run --only roofline` runs it.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import report, roofline

ENGINE = {"dtype": "float32", "tensor_parallel_size": 2, "enable_expert_parallel": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moe_serving.tinymodel import make_model

    return Path(make_model("gemma4", tmp_path_factory.mktemp("tiny") / "gemma4", seed=0))


def test_probe_measures_a_finite_bandwidth() -> None:
    gbs = roofline.memory_bandwidth_gbs(repeats=2)
    assert math.isfinite(gbs) and gbs > 0


def test_prediction_is_the_planners_formula_and_scales_with_bandwidth(model_dir: Path) -> None:
    one = roofline.predict(model_dir, ENGINE, 10.0, batch=32, context=80)
    two = roofline.predict(model_dir, ENGINE, 20.0, batch=32, context=80)
    by = one["tokens_per_s_by_efficiency"]
    # Memory-bound on one node: twice the bandwidth, twice the tokens; 100% = 2 x 50%.
    assert two["tokens_per_s_by_efficiency"]["0.5"] == pytest.approx(2 * by["0.5"])
    assert by["1"] == pytest.approx(2 * by["0.5"])
    assert one["bytes_per_param"] == 4.0 and one["tp"] == 2


def test_report_states_the_ratio() -> None:
    result = {
        "bandwidth_gbs": 10.0,
        "batch": 32,
        "tokens": 32,
        "prompt_tokens": 64,
        "predicted": {"tokens_per_s_by_efficiency": {"0.5": 1000.0, "1": 2000.0}},
        "measured": {"decode_tokens_per_s": 250.0},
        "ratio_measured_to_predicted": {"0.5": 0.25, "1": 0.125},
    }
    text = "\n".join(report.roofline_lines({"roofline": result}))
    assert "| 10.0 GB/s | 1,000 tok/s | 2,000 tok/s | 250 tok/s | 0.250x | 0.125x |" in text
    assert report.roofline_lines({}) == ["Not run."]
