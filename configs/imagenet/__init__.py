"""ImageNet recipes (mdistiller's protocol)."""
