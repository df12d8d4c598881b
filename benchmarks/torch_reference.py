"""PyTorch reference for the CIFAR-100 knowledge-distillation train step.

This is the baseline that kdjax's JAX benchmark compares against in the same
invocation. It mirrors the setup of

* RepDistiller (Tian, Krishnan & Isola, "Contrastive Representation
  Distillation", ICLR 2020; https://github.com/HobbitLong/RepDistiller),
  ``models/resnet.py`` and ``train_student.py`` with ``--distill kd -r 0.1 -a 0.9``;
* mdistiller (https://github.com/megvii-research/mdistiller), whose CIFAR-100
  KD baseline uses the same networks, loss and optimiser.

The code is written from scratch; only the architecture facts (CIFAR ResNet
with BasicBlocks, widths [32, 64, 128, 256] for the ``x4`` variants, Kaiming
fan-out init) and the hyper-parameters (T=4, CE weight 0.1, KD weight 0.9,
SGD lr 0.05, momentum 0.9, weight decay 5e-4) follow those repositories.

Run::

    python -m benchmarks.torch_reference --student=resnet8x4 \
        --teacher=resnet32x4 --num_classes=100 --batch_size=32 --steps=10

The last line printed is one JSON object (see :func:`benchmark`).
"""

import argparse
import json
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PyTorch is needed for the reference benchmark: "
        "pip install 'torch==2.13.0' (or pip install -e '.[torch]')"
    ) from err

# name -> (depth, filters); as in RepDistiller models/resnet.py.
ARCHS = {
    **{f"resnet{d}": (d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}

# Parameter counts with num_classes=100 (sum of p.numel() over parameters()).
EXPECTED_PARAMS = {"resnet8x4": 1_233_540, "resnet32x4": 7_433_860}


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU-3x3 conv-BN plus shortcut, then ReLU.

    The shortcut is a 1x1 conv (no bias) + BN when the stride or the width
    changes, and the identity otherwise.
    """

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet of RepDistiller: stem, 3 stages (strides 1, 2, 2), 8x8 pool, fc."""

    def __init__(self, depth, filters, num_classes=100):
        super().__init__()
        assert (depth - 2) % 6 == 0, "BasicBlock ResNet depth must be 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        stages, in_planes = [], filters[0]
        for planes, stride in zip(filters[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(filters[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))  # 32x32
        x = self.layer3(self.layer2(self.layer1(x)))  # 8x8
        x = F.avg_pool2d(x, 8).flatten(1)
        return self.fc(x)


def build_model(name, num_classes=100, **kwargs):
    """Build a CIFAR ResNet of RepDistiller by name (see ``ARCHS``), or a ViT of
    ``benchmarks.torch_vit.VITS`` (``kwargs``: its ``depth``)."""
    from benchmarks import torch_vit  # pylint: disable=g-import-not-at-top
    if name in torch_vit.VITS:
        return torch_vit.build_vit(name, num_classes, **kwargs)
    if name not in ARCHS:
        raise ValueError(f"unknown model {name!r}; choose from "
                         f"{sorted(ARCHS) + sorted(torch_vit.VITS)}")
    if kwargs:
        raise ValueError(f"{name} takes no model arguments, got {sorted(kwargs)}")
    depth, filters = ARCHS[name]
    return CifarResNet(depth, filters, num_classes)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def param_count(name, num_classes=100):
    """Parameter count of a freshly built model; checked against RepDistiller's."""
    n = count_params(build_model(name, num_classes))
    if num_classes == 100 and name in EXPECTED_PARAMS:
        assert n == EXPECTED_PARAMS[name], (name, n, EXPECTED_PARAMS[name])
    return n


def kd_loss(student_logits, teacher_logits, labels, T=4.0, ce_weight=0.1, kd_weight=0.9):
    """0.1 * CE + 0.9 * T^2 * KL(softmax(t/T) || softmax(s/T)), batch-mean (Hinton KD)."""
    ce = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(
        F.log_softmax(student_logits / T, dim=1),
        F.softmax(teacher_logits / T, dim=1),
        reduction="batchmean",
    )
    return ce_weight * ce + kd_weight * (T ** 2) * kl


def make_optimizer(student):
    """SGD as in RepDistiller/mdistiller CIFAR-100 (lr 0.05, momentum 0.9, wd 5e-4)."""
    return torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def kd_train_step(student, teacher, optimizer, images, labels, T=4.0):
    """One KD step: teacher (eval, no grad) forward, student (train) forward/backward/SGD."""
    student.train()
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(images)
    loss = kd_loss(student(images), teacher_logits, labels, T=T)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def benchmark(student="resnet8x4", teacher="resnet32x4", num_classes=100,
              batch_size=32, steps=10, warmup=2, threads=None, seed=0):
    """Time ``steps`` KD train steps on random CIFAR-shaped data (after ``warmup``)."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    s_model = build_model(student, num_classes)
    t_model = build_model(teacher, num_classes)
    s_params, t_params = count_params(s_model), count_params(t_model)
    for name, n in ((student, s_params), (teacher, t_params)):
        if num_classes == 100 and name in EXPECTED_PARAMS:
            assert n == EXPECTED_PARAMS[name], (name, n, EXPECTED_PARAMS[name])
    optimizer = make_optimizer(s_model)
    images = torch.randn(batch_size, 3, 32, 32, dtype=torch.float32)
    labels = torch.randint(0, num_classes, (batch_size,))

    loss = None
    for _ in range(warmup):
        loss = kd_train_step(s_model, t_model, optimizer, images, labels)
    if loss is not None:
        loss.item()
    start = time.perf_counter()
    for _ in range(steps):
        loss = kd_train_step(s_model, t_model, optimizer, images, labels)
    if loss is not None:
        loss.item()  # CPU is synchronous; this just makes sure the work is done
    elapsed = time.perf_counter() - start

    return {
        "examples_per_sec": batch_size * steps / elapsed if steps else 0.0,
        "step_ms": 1000.0 * elapsed / steps if steps else 0.0,
        "student_params": s_params,
        "teacher_params": t_params,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "backend": "torch-cpu",
        "student": student,
        "teacher": teacher,
        "batch_size": batch_size,
        "steps": steps,
    }


def make_timed_runner(student="resnet8x4", teacher="resnet32x4", num_classes=100,
                      batch_size=32, seed=0):
    """Return ``run(n) -> seconds`` timing ``n`` KD train steps, for interleaved rounds.

    On a machine with CUDA the models and batch go to the GPU (with `cudnn.benchmark`, as
    mdistiller's and RepDistiller's training scripts set it); ``loss.item()`` synchronises.
    """
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    s_model = build_model(student, num_classes).to(device)
    t_model = build_model(teacher, num_classes).to(device)
    optimizer = make_optimizer(s_model)
    images = torch.randn(batch_size, 3, 32, 32, dtype=torch.float32, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)

    def run(steps):
        start = time.perf_counter()
        loss = None
        for _ in range(steps):
            loss = kd_train_step(s_model, t_model, optimizer, images, labels)
        if loss is not None:
            loss.item()
        return time.perf_counter() - start

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description="PyTorch CPU reference KD train-step benchmark")
    p.add_argument("--student", default="resnet8x4", choices=sorted(ARCHS))
    p.add_argument("--teacher", default="resnet32x4", choices=sorted(ARCHS))
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = benchmark(args.student, args.teacher, args.num_classes, args.batch_size,
                       args.steps, args.warmup, args.threads, args.seed)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
