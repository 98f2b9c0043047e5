"""Measuring models: perplexity and bits per byte (``perplexity``), benchmark tasks in
lm-evaluation-harness's formats (``tasks``, ``builtin``, ``runner``), the lm-eval plug-in
(``harness``)."""

from folklm.eval.perplexity import perplexity

__all__ = ["perplexity"]
