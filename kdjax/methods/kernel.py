"""Kernel-based feature methods: CC (correlation congruence) and NST (neuron selectivity transfer)."""

METHODS = ()
