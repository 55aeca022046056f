# Sourced by every recipe: run from the repository root, with the project's venv if there is one.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
fewshot() { if [ -x .venv/bin/fewshot ]; then .venv/bin/fewshot "$@"; else command fewshot "$@"; fi; }
python() { if [ -x .venv/bin/python ]; then .venv/bin/python "$@"; else command python3 "$@"; fi; }
export -f fewshot python
