"""CIFAR-100 recipes: the RepDistiller / mdistiller protocol for every pair of their tables."""
