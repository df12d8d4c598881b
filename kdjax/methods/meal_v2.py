"""MEAL V2: averaged soft labels of several teachers plus an adversarial discriminator (Shen & Savvides 2020)."""

METHODS = ()
