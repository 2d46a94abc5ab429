"""Measurement of recfunnel: the benchmarks (`recfunnel bench …`) and the load tester
(`recfunnel loadtest`), one module each, over one shared harness (`bench.harness`) and one
set of figures (`bench.plots`).

This package imports the product; nothing in the product imports it, except the root of the
command line, which registers its commands. It stands beside the product's rooms, not in
one of them, because it measures all of them at once.
"""
