"""``QuantizeRecipe``: every setting of one ``folk quantize`` run, checked in one place.

Like :class:`folklm.tune.recipe.Recipe` and :class:`folklm.merge.config.MergeConfig`, the
recipe is a typed dataclass that the CLI fills from its flags and Python users build
directly; :meth:`QuantizeRecipe.validate` refuses a bad combination before any work, and
:meth:`QuantizeRecipe.record` is what the hub stores with the new entry.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from folklm.errors import FolkError
from folklm.kernels.schemes import Scheme, parse_scheme
from folklm.quant.gptq import GPTQConfig

DTYPES = ("bfloat16", "float32")


@dataclass
class QuantizeRecipe:
    """How to quantize a model.

    Attributes:
        scheme: one of :data:`folklm.kernels.schemes.SCHEMES`.
        calibration: a UTF-8 text file (GPTQ only).
        dtype: dtype of the scales and of the float parts (embeddings, norms).
        keep_head: keep the LM head unquantized.
        gptq: GPTQ settings (damping, act-order, samples); the group size is the scheme's.
            None for a GPTQ scheme: act-order on, the other defaults of ``GPTQConfig``.
        seed: seeds the choice of calibration windows.
    """

    scheme: str
    calibration: str | os.PathLike | None = None
    dtype: str = "bfloat16"
    keep_head: bool = True
    gptq: GPTQConfig | None = None
    seed: int = 0

    @property
    def parsed(self) -> Scheme:
        return parse_scheme(self.scheme)

    def validate(self) -> QuantizeRecipe:
        """Check every setting; returns a copy with the GPTQ defaults filled in.

        Raises:
            FolkError: an unknown scheme or dtype, or calibration/GPTQ settings that do
                not match the scheme.
        """
        s = self.parsed
        if self.dtype not in DTYPES:
            raise FolkError(f"dtype {self.dtype!r}: expected one of: {', '.join(DTYPES)}")
        if s.method == "gptq":
            if self.calibration is None:
                raise FolkError(f"scheme {s.name} needs --calibration FILE (UTF-8 text)")
            return replace(self, gptq=self.gptq or GPTQConfig(act_order=True))
        if self.calibration is not None:
            raise FolkError(f"scheme {s.name} takes no calibration file (gptq-int4 does)")
        if self.gptq is not None:
            raise FolkError(f"scheme {s.name} takes no GPTQ settings (gptq-int4 does)")
        return self

    def record(self, dtype: str, source: str) -> dict[str, Any]:
        """The recipe the hub stores: the settings, the dtype used and the source model."""
        out: dict[str, Any] = {
            "scheme": self.scheme,
            "dtype": dtype,
            "keep_head": self.keep_head,
            "source": source,
        }
        if self.gptq is not None:
            out["gptq"] = {k: v for k, v in asdict(self.gptq).items() if k != "group_size"}
            out["gptq"]["group_size"] = self.parsed.group_size
        return out
