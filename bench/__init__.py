"""Side-by-side benchmarks: ``python -m bench.NAME`` runs ours and the comparison in one run."""
