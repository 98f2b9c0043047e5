"""folklm as a model type of EleutherAI's lm-evaluation-harness (``--model folklm``).

``FolkLM`` implements the harness's ``LM`` interface (lm_eval/api/model.py, v0.4):
``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until``, on folklm's scorer
(prefix-cached, length-sorted batches). It is registered as ``folklm`` when this module is
imported. lm-eval 0.4 finds models only in its own registry (it reads no entry points), so
the ``lm_eval`` command needs the import first; this module's ``main`` is that command
with folklm registered:

    python -m folklm.eval.harness --model folklm --model_args model=NAME --tasks hellaswag

``model`` is a registry name, a Hugging Face folder or a GGUF file (empty: the bundled
default); ``dtype`` and ``batch_size`` are the other model arguments.
"""

from __future__ import annotations

import sys
from typing import Any

from folklm.errors import FolkError
from folklm.ops.sampling import DISTRIBUTION_OPTIONS

try:
    import lm_eval.models  # noqa: F401  (the built-in models first: lm-eval registers them
    from lm_eval.api.model import LM  # only into an empty registry, which ours would fill)
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise FolkError("the lm-eval plug-in needs lm-eval: pip install 'folklm[harness]'") from e

from lm_eval.utils import simple_parse_args_string

from folklm.engine.llm import LLM, load  # noqa: E402
from folklm.eval.scorer import Scorer  # noqa: E402
from folklm.hub.resolve import resolve_path  # noqa: E402


@register_model("folklm")
class FolkLM(LM):
    """An lm-eval ``LM`` backed by a folklm model."""

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 16,
        max_length: int | None = None,
        llm: LLM | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if llm is None:
            llm = load(resolve_path(model or None), dtype=dtype, resolve_base=resolve_path)
        size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(llm, batch_size=size, max_length=max_length)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        extra.pop("device", None)
        return cls(**{**extra, **args})

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([req.args for req in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([req.args[0] for req in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # requests with the same stop strings and length limit run as one batch
        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kw = dict(req.args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            opts = sampling_options(kw)
            key = (tuple(until), int(kw.get("max_gen_toks", 256)), tuple(sorted(opts.items())))
            by_kwargs.setdefault(key, []).append(i)
        for (until, max_toks, opts), idx in by_kwargs.items():
            contexts = [requests[i].args[0] for i in idx]
            texts = self.scorer.generate(contexts, until, max_toks, **dict(opts))
            for i, t in zip(idx, texts, strict=True):
                out[i] = t
        done = [t for t in out if t is not None]
        assert len(done) == len(out)  # every request belongs to one batch
        return done


SAMPLING_KEYS = (*DISTRIBUTION_OPTIONS, "seed")


def sampling_options(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``SamplingParams`` fields among a task's ``gen_kwargs`` (greedy unless
    ``do_sample``, as in the harness's HF backend)."""
    opts = {k: gen_kwargs[k] for k in SAMPLING_KEYS if gen_kwargs.get(k) is not None}
    if not gen_kwargs.get("do_sample", False):
        opts["temperature"] = 0.0
    return opts


def main(argv: list[str] | None = None) -> None:
    """The ``lm_eval`` command line with the ``folklm`` model type registered."""
    # lazy: lm-eval's command line, needed only by the folk-lm-eval command
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
