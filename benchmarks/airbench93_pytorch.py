"""airbench93's own PyTorch code on the CPU: the yardstick for the project's training speed.

KellerJordan/cifar10-airbench (airbench/lib_airbench93.py with airbench/utils.py) moved from the GPU
to the CPU: bfloat16 autocast instead of ``.half().cuda()`` (``--dtype float32``: no autocast, for a
CPU without bfloat16 instructions, where the project trains in float32 too), channels-last kept, CUDA
events replaced by ``time.perf_counter``; the network, optimizer, schedule, lookahead, augmentation and test-time
views as published. A measuring tool, never part of the project (nothing imports it, and PyTorch is
not a dependency): run it from a scratch environment, see docs/results.md.

    python -m tools.arrays data/prepared splits.npz        # the pipeline's train and val images
    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch==2.13.0 numpy
    /tmp/torch/bin/python benchmarks/airbench93_pytorch.py splits.npz 10   # EPOCHS, then any of:
        [--widths 64,128,128] [--seed 0] [--steps N] [--dtype float32]

It prints each epoch's seconds, the training time, the steady-state rate (images/s from the third
step of each epoch on) and the accuracy on the file's test images without and with the views.
"""

import argparse
import time
from math import ceil

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

hyp = {
    "opt": {
        "batch_size": 1024,
        "lr": 11.5,
        "momentum": 0.85,
        "weight_decay": 0.0153,
        "bias_scaler": 64.0,
        "label_smoothing": 0.2,
        "whiten_bias_epochs": 3,
    },
    "aug": {"flip": True, "translate": 2},
    "net": {"whitening": {"kernel_size": 2}, "batchnorm_momentum": 0.6, "scaling_factor": 1 / 9, "tta_level": 2},
}


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class Mul(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-12, momentum=hyp["net"]["batchnorm_momentum"], weight=False, bias=True):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = weight
        self.bias.requires_grad = bias


class Conv(nn.Conv2d):
    def __init__(self, cin, cout, kernel_size=3, padding="same", bias=False):
        super().__init__(cin, cout, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(cout)
        self.conv2 = Conv(cout, cout)
        self.norm2 = BatchNorm(cout)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.conv1(x)
        x = self.pool(x)
        x = self.norm1(x)
        x = self.activ(x)
        x = self.conv2(x)
        x = self.norm2(x)
        x = self.activ(x)
        return x


def make_net(widths, num_classes):
    wwidth = 2 * 3 * hyp["net"]["whitening"]["kernel_size"] ** 2
    net = nn.Sequential(
        Conv(3, wwidth, kernel_size=hyp["net"]["whitening"]["kernel_size"], padding=0, bias=True),
        nn.GELU(),
        ConvGroup(wwidth, widths[0]),
        ConvGroup(widths[0], widths[1]),
        ConvGroup(widths[1], widths[2]),
        nn.MaxPool2d(3),
        Flatten(),
        nn.Linear(widths[2], num_classes, bias=False),
        Mul(hyp["net"]["scaling_factor"]),
    )
    net[0].weight.requires_grad = False
    return net.to(memory_format=torch.channels_last)


def batch_flip_lr(inputs):
    flip_mask = (torch.rand(len(inputs)) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip_mask, inputs.flip(-1), inputs)


def batch_crop(images, crop_size):
    r = (images.size(-1) - crop_size) // 2
    shifts = torch.randint(-r, r + 1, size=(len(images), 2))
    out = torch.empty((len(images), 3, crop_size, crop_size), dtype=images.dtype)
    for sy in range(-r, r + 1):
        for sx in range(-r, r + 1):
            mask = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
            out[mask] = images[mask, :, r + sy : r + sy + crop_size, r + sx : r + sx + crop_size]
    return out


class Loader:
    def __init__(self, images_uint8, labels, batch_size, train, mean, std):
        self.images = (torch.tensor(images_uint8).float() / 255).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.tensor(labels).long()
        self.mean, self.std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        self.batch_size, self.train, self.epoch, self.proc = batch_size, train, 0, {}

    def normalize(self, x):
        return (x - self.mean) / self.std

    def __len__(self):
        return len(self.images) // self.batch_size if self.train else ceil(len(self.images) / self.batch_size)

    def __iter__(self):
        if self.epoch == 0:
            images = self.proc["norm"] = self.normalize(self.images)
            images = self.proc["flip"] = batch_flip_lr(images)
            self.proc["pad"] = F.pad(images, (2,) * 4, "reflect")
        images = batch_crop(self.proc["pad"], self.images.shape[-2])
        if self.epoch % 2 == 1:
            images = images.flip(-1)
        images = images.contiguous(memory_format=torch.channels_last)
        self.epoch += 1
        indices = torch.randperm(len(images))
        for i in range(len(self)):
            idxs = indices[i * self.batch_size : (i + 1) * self.batch_size]
            yield images[idxs], self.labels[idxs]


def init_whitening_conv(layer, train_set, eps=5e-4):
    c, (h, w) = train_set.shape[1], layer.weight.data.shape[2:]
    patches = train_set.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).float()
    n = patches.shape[0]
    flat = patches.view(n, -1)
    cov = (flat.T @ flat) / n
    eigenvalues, eigenvectors = torch.linalg.eigh(cov, UPLO="U")
    eigenvalues, eigenvectors = eigenvalues.flip(0).view(-1, 1, 1, 1), eigenvectors.T.reshape(c * h * w, c, h, w).flip(0)
    scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
    layer.weight.data[:] = torch.cat((scaled, -scaled))


class LookaheadState:
    def __init__(self, net):
        self.net_ema = {k: v.clone() for k, v in net.state_dict().items()}

    def update(self, net, decay):
        for ema_param, net_param in zip(self.net_ema.values(), net.state_dict().values()):
            if net_param.dtype in (torch.half, torch.float):
                ema_param.lerp_(net_param, 1 - decay)
                net_param.copy_(ema_param)


def autocast(dtype):
    """Mixed precision as airbench's fp16 on a GPU, in ``dtype`` on the CPU; float32: none."""
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


def infer(model, images, tta_level, dtype):
    def basic(x):
        return model(x).float()

    def mirror(x):
        return 0.5 * basic(x) + 0.5 * basic(x.flip(-1))

    def mirror_translate(x):
        logits = mirror(x)
        padded = F.pad(x, (1,) * 4, "reflect")
        shifted = [padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]]
        return 0.5 * logits + 0.5 * torch.stack([mirror(s) for s in shifted]).mean(0)

    fn = [basic, mirror, mirror_translate][tta_level]
    model.eval()
    with torch.no_grad(), autocast(dtype):
        return torch.cat([fn(x.contiguous(memory_format=torch.channels_last)) for x in images.split(2000)])


def main(args):
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    data = np.load(args.data)
    widths = [int(w) for w in args.widths.split(",")]
    num_classes = int(data["train_labels"].max()) + 1
    mean = torch.tensor(data["train_images"].reshape(-1, 3).mean(0) / 255, dtype=torch.float32)
    std = torch.tensor(data["train_images"].reshape(-1, 3).std(0) / 255, dtype=torch.float32)
    o = hyp["opt"]
    train_loader = Loader(data["train_images"], data["train_labels"], o["batch_size"], True, mean, std)
    batch_size, momentum, epochs = o["batch_size"], o["momentum"], args.epochs
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
    lr = o["lr"] / kilostep_scale
    wd = o["weight_decay"] * batch_size / kilostep_scale
    lr_biases = lr * o["bias_scaler"]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=o["label_smoothing"], reduction="none")

    def triangle(steps, start=0, end=0, peak=0.5):
        xp = torch.tensor([0, int(peak * steps), steps])
        fp = torch.tensor([start, 1, end])
        x = torch.arange(1 + steps)
        m = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
        b = fp[:-1] - (m * xp[:-1])
        indices = torch.clamp(torch.sum(torch.ge(x[:, None], xp[None, :]), 1) - 1, 0, len(m) - 1)
        return m[indices] * x + b[indices]

    total_train_steps = ceil(len(train_loader) * epochs)
    lr_schedule = triangle(total_train_steps, start=0.2, end=0.07, peak=0.23)
    model = make_net(widths, num_classes)
    norm_biases = [p for k, p in model.named_parameters() if "norm" in k and p.requires_grad]
    other_params = [p for k, p in model.named_parameters() if "norm" not in k and p.requires_grad]
    param_configs = [
        dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
        dict(params=other_params, lr=lr, weight_decay=wd / lr),
    ]
    optimizer = torch.optim.SGD(param_configs, momentum=momentum, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_schedule[i])
    started = time.perf_counter()
    init_whitening_conv(model[0], train_loader.normalize(train_loader.images[:5000]))
    total_time = time.perf_counter() - started
    lookahead_state, current_steps, timed_images, timed_seconds = None, 0, 0, 0.0
    for epoch in range(ceil(epochs)):
        model[0].bias.requires_grad = epoch < o["whiten_bias_epochs"]
        started = time.perf_counter()
        model.train()
        step_start = None
        for step_in_epoch, (inputs, labels) in enumerate(train_loader, start=1):
            with autocast(dtype):
                outputs = model(inputs)
                loss = loss_fn(outputs.float(), labels).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            current_steps += 1
            if step_in_epoch == 3:  # steady state: timed from the end of each epoch's third step
                step_start = time.perf_counter()
            elif step_start is not None:
                timed_images += len(inputs)
            if epoch >= 3 and current_steps % 5 == 0:
                if lookahead_state is None:
                    lookahead_state = LookaheadState(model)
                else:
                    rho = 0.95**5 * (current_steps / total_train_steps) ** 3.0
                    lookahead_state.update(model, decay=rho)
            if current_steps >= total_train_steps or (args.steps and current_steps >= args.steps):
                break
        if step_start is not None:
            timed_seconds += time.perf_counter() - step_start
        if lookahead_state is not None:
            lookahead_state.update(model, decay=1.0)
        seconds = time.perf_counter() - started
        total_time += seconds
        print(f"epoch {epoch + 1}: {seconds:.1f} s, loss {loss.item() / batch_size:.4f}", flush=True)
        if args.steps and current_steps >= args.steps:
            break
    rate = timed_images / timed_seconds if timed_seconds else float("nan")
    print(f"training seconds {total_time:.1f}; steady-state {rate:.1f} images/s")
    if args.steps:
        return
    test_images = train_loader.normalize((torch.tensor(data["test_images"]).float() / 255).permute(0, 3, 1, 2))
    test_labels = torch.tensor(data["test_labels"]).long()
    for level in (0, 2):
        accuracy = (infer(model, test_images, level, dtype).argmax(1) == test_labels).float().mean().item()
        print(f"test accuracy, tta level {level}: {accuracy:.4f}")


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("epochs", type=float)
    p.add_argument("--widths", default="64,128,128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="stop after N steps (speed probe)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute precision")
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    main(args)
