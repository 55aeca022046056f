"""fewshot: a command-line experiment runner for few-shot learning that does not run out of memory."""

__version__ = "0.1.0"
