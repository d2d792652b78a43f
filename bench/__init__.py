"""cilia benchmarks: `make bench` or `python -m bench.run [--only podstart,samenode] [--quick]`.

Every benchmark builds its own uniquely named lab (and, for comparisons, its own baseline
namespaces), measures side by side in one run, and always tears everything down."""
