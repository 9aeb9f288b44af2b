"""int8 on a CPU without VNNI: the accuracy floor at work, on this CPU and on an emulated AVX2-only one.

ONNX Runtime's uint8 x int8 convolution kernels on x86 without VNNI add products pairwise in 16 bits and can
saturate. This runs `squeeze quantize` on two models:

1. `zoo:digits-cnn`;
2. a user-style residual CNN (3x32x32, defined below, trained here on the digits with its own
   normalization `(x - 0.5) / 0.5`, passed as `--normalize 0.5,0.5`);

once natively and once with squeeze's process under `qemu-x86_64 -cpu EPYC-Milan` (an AMD Zen 3 model:
AVX2, no AVX-512, no VNNI; Debian: apt-get install qemu-user-static), where ONNX Runtime dispatches to its
AVX2 kernels and squeeze detects no int8 dot product. For each run: the candidates tried, their top-1
agreement, SNR and accuracy against fp32, the verdict, the chosen one and its speedup.

Under qemu only the squeeze process is emulated (the parity checks, the quantization); the measurement
worker it starts is a new process and runs natively, so the speedups printed for that run are this CPU's,
not an AVX2 machine's.

    python benchmarks/quant_no_vnni.py [--skip-emulated]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
QEMU = "qemu-x86_64-static"
NORMALIZE = "0.5,0.5"


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def resblocknet(num_classes: int = 10) -> nn.Module:
    """A small residual CNN for 3x32x32 inputs, as a user would write one."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         _Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def train_user_model(weights: Path) -> None:
    from squeeze.data import load_data
    from squeeze.preprocessing import parse_normalize
    from squeeze.train import evaluate, train_classifier

    data = load_data("digits", input_shape=(1, 3, 32, 32), preprocessing=parse_normalize(NORMALIZE))
    torch.manual_seed(0)
    model = resblocknet()
    train_classifier(model, data.train, epochs=8, lr=3e-3)
    print(f"user-style residual CNN trained with (x - 0.5) / 0.5: test top-1 {100 * evaluate(model, data.test).top1:.2f}%")
    torch.save(model.state_dict(), weights)


def quantize(args: list[str], out: Path, emulated: bool) -> dict | None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)])}
    cmd = [sys.executable, "-m", "squeeze", "quantize", *args, "--data", "digits", "--out", str(out), "--no-cache"]
    if emulated:
        site = next(p for p in sys.path if p.endswith("site-packages"))
        env["PYTHONPATH"] += os.pathsep + site  # the emulated interpreter does not see the venv by itself
        cmd = [QEMU, "-cpu", "EPYC-Milan", os.path.realpath(sys.executable), *cmd[1:]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  exit {r.returncode}: {' '.join(r.stderr.split())[-600:]}")
        return None
    return json.loads((out / "report.json").read_text())


def show(label: str, report: dict | None) -> None:
    print(f"\n{label}")
    if report is None:
        return
    rec = report["stages"][0]["record"]
    cpu, choice = rec["cpu_int8"], rec["type_choice"]
    print(f"  CPU int8 features seen: {', '.join(cpu['int8_isa'])}; int8 dot product: {cpu['int8_dot_product']}")
    for c in choice["candidates"]:
        p, s = c["parity"], c["speedup"]
        chosen = all(c[k] == v for k, v in choice["chosen"].items())
        verdict = "CHOSEN" if chosen else ("below floor: " + "; ".join(p["below_floor"]) if p["below_floor"] else "passes")
        print(f"  {c['label']:22s} speedup {s['ratio']:.3f}x [{s['low']:.3f}, {s['high']:.3f}]  agreement "
              f"{100 * p['top1_agreement']:6.2f}%  SNR {p['snr_db']:5.1f} dB  top-1 {100 * p['top1']:6.2f}% "
              f"(fp32 {100 * p['reference_top1']:.2f}%)  {verdict}")
    acc, sp = report["accuracy"], report["latency"]["speedup"]
    print(f"  shipped: {rec['summary']}; top-1 {100 * acc['original_top1']:.2f}% -> {100 * acc['final_top1']:.2f}% "
          f"({acc['delta_pt']:+.2f} pt, {acc['n']} {acc['split']} images); speedup {sp['ratio']:.3f}x "
          f"[{sp['low']:.3f}, {sp['high']:.3f}] (second, interleaved run)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-emulated", action="store_true", help="only the native runs")
    ap.add_argument("--skip-native", action="store_true", help="only the emulated runs")
    ap.add_argument("--models", nargs="+", choices=("digits", "residual"), default=["digits", "residual"])
    opts = ap.parse_args()
    emulate = not opts.skip_emulated and shutil.which(QEMU) is not None
    if not opts.skip_emulated and not emulate:
        print(f"{QEMU} not found: the emulated AVX2 runs are skipped (Debian: apt-get install qemu-user-static)")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "resblocknet.pt"
        train_user_model(weights)
        models = {"digits": ("zoo:digits-cnn", ["zoo:digits-cnn"]),
                  "residual": ("user residual CNN", ["quant_no_vnni:resblocknet", "--weights", str(weights),
                                                     "--input-shape", "1,3,32,32", "--normalize", NORMALIZE])}
        sides = [e for e in (False, True) if (e and emulate) or (not e and not opts.skip_native)]
        for name, args in (models[m] for m in opts.models):
            for emulated in sides:
                where = "emulated AMD EPYC-Milan (AVX2, no VNNI)" if emulated else "this CPU"
                out = Path(tmp) / f"{name.replace(' ', '-').replace(':', '-')}-{'emu' if emulated else 'native'}"
                show(f"{name} on {where}", quantize(args, out, emulated))


if __name__ == "__main__":
    main()
