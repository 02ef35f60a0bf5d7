"""Benchmarks behind `longcat bench NAME`: each measures our code and its comparison side by side in
one run and reports ratios, since absolute times drift on shared machines."""
