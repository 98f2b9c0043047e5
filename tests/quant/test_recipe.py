"""QuantizeRecipe: one object holds and checks every setting of a quantize run."""

from __future__ import annotations

import pytest

from folklm.errors import FolkError
from folklm.quant.gptq import GPTQConfig
from folklm.quant.pipeline import quantize_model
from folklm.quant.recipe import QuantizeRecipe


@pytest.mark.parametrize(
    "recipe, words",
    [
        (QuantizeRecipe("int3"), "unknown quantization scheme 'int3'"),
        (QuantizeRecipe("int8", dtype="float16"), "dtype 'float16'"),
        (QuantizeRecipe("gptq-int4"), "needs --calibration"),
        (QuantizeRecipe("int8", calibration="c.txt"), "takes no calibration"),
        (QuantizeRecipe("nf4", gptq=GPTQConfig()), "takes no GPTQ settings"),
    ],
)
def test_validate_refuses_bad_settings_before_any_work(recipe, words, tmp_path):
    with pytest.raises(FolkError, match=words):
        recipe.validate()
    with pytest.raises(FolkError, match=words):  # the pipeline refuses it the same way
        quantize_model(str(tmp_path / "absent"), recipe, "out:v1")


def test_gptq_defaults_and_the_recorded_recipe():
    r = QuantizeRecipe("gptq-int4-g64", calibration="c.txt").validate()
    assert r.gptq is not None and r.gptq.act_order
    record = r.record("bfloat16", "base:latest")
    assert record["scheme"] == "gptq-int4-g64" and record["source"] == "base:latest"
    assert record["gptq"]["group_size"] == 64 and "calibration" not in record
    plain = QuantizeRecipe("int8").validate().record("float32", "/m")
    assert plain == {"scheme": "int8", "dtype": "float32", "keep_head": True, "source": "/m"}
    with pytest.raises(TypeError, match="dtype"):
        quantize_model(None, QuantizeRecipe("int8"), "x", dtype="float32")
