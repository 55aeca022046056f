# fewshot's everyday commands

# every experiment command, briefly, on the built-in data, then the combined table
demo:
    fewshot demo --out runs/demo-$(date -u +%Y%m%dT%H%M%SZ)

# the whole test-suite
test:
    pytest -q

# ruff over the package, the tests and the benchmarks
lint:
    ruff check fewshot_cli tests benchmarks

# every recipe in recipes/, rewriting the tables in results/
tables:
    for r in recipes/*.sh; do bash "$r"; done
