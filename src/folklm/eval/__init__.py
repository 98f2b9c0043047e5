"""Measuring models: perplexity / bits per byte now; task suites and lm-eval later."""

from folklm.eval.perplexity import perplexity

__all__ = ["perplexity"]
