"""`python -m fewshot_cli` (and `torchrun -m fewshot_cli`) runs the CLI."""

from fewshot_cli.cli import main

main()
