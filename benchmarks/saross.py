"""SAROSS-Net's skip modules side by side: parameters, FLOPs, latency, memory.

    python benchmarks/saross.py [--encoder mambavision_b] [--size 512] [--repeats 3] [--full-latency]

1. Params and FLOPs (torch.utils.flop_counter) at size x size, batch 1, of the decoder
   with no skip module, 3x3 convs, and CAFT on the skips. The encoder (MambaVision-B by
   default) is the same in all three, so the differences are the decoder's; they are
   printed against the paper's (PAPER.md: CAFT +0.89M params, +11.45 GFLOPs; 3x3 conv
   +6.95M, +37.06 GFLOPs, MambaVision-B, 512x512) as ratios. torch's counter counts a
   multiply-add as 2 FLOPs; the paper does not say which convention it uses (fvcore and
   thop count multiply-adds), so both our FLOPs and MACs (= FLOPs / 2) are shown.
   The paper's decoder widths are not given; ours are `--decoder-channels`.
2. CPU latency of the decoder per variant (median of `--repeats`, on the same encoder
   features), and the encoder's once (identical in all variants; `--full-latency` times
   each whole model instead, slow on CPU with MambaVision's reference scan).
3. Peak memory of one CAFT block (the stride-4 skip of the encoder, its channels) for
   inputs of 1024^2 against 512^2: activation bytes live at once, measured with a torch
   dispatch probe on CPU (torch.cuda.max_memory_allocated on a GPU). Goal about 4x
   (linear in pixels); pixel-by-pixel attention would grow 16x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import weakref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dakd.models.caft import CAFT  # noqa: E402
from dakd.models.decoder import UNetPlusPlusDecoder  # noqa: E402
from dakd.models.encoders import build_encoder  # noqa: E402
from dakd.inference import describe_cpu  # noqa: E402

PAPER = {"conv3x3": {"params_m": 6.95, "gflops": 37.06}, "caft": {"params_m": 0.89, "gflops": 11.45}}
VARIANTS = ("none", "conv3x3", "caft")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors produced inside the mode and alive at once (CPU memory probe)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                key = t.untyped_storage().data_ptr()
                if key and key not in self.live:
                    self.live[key] = t.untyped_storage().nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(t, self._release, key)
        return out


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder(variant: str, channels, dec_channels, heads: int) -> UNetPlusPlusDecoder:
    return UNetPlusPlusDecoder(encoder_channels=channels, decoder_channels=dec_channels, num_classes=5,
                               skip_module=variant, caft_heads=heads).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def caft_peak(channels: int, size: int, heads: int, device: torch.device) -> int:
    torch.manual_seed(0)
    block = CAFT(hr_channels=channels, lr_channels=2 * channels, heads=heads).to(device).eval()
    s = size // 4
    hr = torch.randn(1, channels, s, s, device=device)
    lr = torch.randn(1, 2 * channels, s // 2, s // 2, device=device)
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            block(lr, hr)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        probe = LiveBytes()
        with probe:
            out = block(lr, hr)
        del out
        return probe.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="mambavision_b")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--decoder-channels", type=int, nargs=3, default=[64, 128, 256])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--full-latency", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()

    enc = build_encoder(args.encoder, in_chans=1, pretrained=None).eval()
    x = torch.randn(1, 1, args.size, args.size)
    with torch.no_grad():
        t0 = time.perf_counter()
        feats = enc(x)
        enc_s = time.perf_counter() - t0
    print(f"encoder {args.encoder}: {count(enc) / 1e6:.2f}M params, channels {enc.channels}, "
          f"CPU forward {1000 * enc_s:.0f} ms at {args.size}x{args.size} ({args.threads} threads)")
    print(f"decoder channels {args.decoder_channels}, CAFT heads {args.heads}, batch 1, {args.size}x{args.size}; "
          f"machine: {describe_cpu()}\n")

    rows = {}
    for v in VARIANTS:
        dec = decoder(v, enc.channels, args.decoder_channels, args.heads)
        with torch.no_grad():
            with FlopCounterMode(display=False) as fc:
                dec(feats, out_size=(args.size, args.size))
            lat = timed(lambda: dec(feats, out_size=(args.size, args.size)), args.repeats)
            full = None
            if args.full_latency:
                full = timed(lambda: dec(enc(x), out_size=(args.size, args.size)), max(1, args.repeats // 2))
        rows[v] = {"params": count(dec), "flops": fc.get_total_flops(), "latency": lat, "full": full}

    base = rows["none"]
    print("| skip module | decoder params | +params vs none | paper | ratio | +GFLOPs (2/MAC) | +GMACs | paper GFLOPs "
          "| ratio (MACs) | decoder CPU ms | +ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        r = rows[v]
        dp = (r["params"] - base["params"]) / 1e6
        df = (r["flops"] - base["flops"]) / 1e9
        dm = df / 2
        dl = 1000 * (r["latency"] - base["latency"])
        paper = PAPER.get(v)
        pp = f"+{paper['params_m']:.2f}M" if paper else "-"
        pr = f"{dp / paper['params_m']:.2f}" if paper else "-"
        pf = f"+{paper['gflops']:.2f}" if paper else "-"
        fr = f"{dm / paper['gflops']:.2f}" if paper else "-"
        print(f"| {v} | {r['params'] / 1e6:.2f}M | +{dp:.2f}M | {pp} | {pr} | +{df:.2f} | +{dm:.2f} | {pf} | {fr} "
              f"| {1000 * r['latency']:.0f} | {dl:+.0f} |")
    print(f"\nCAFT vs 3x3 conv: params {(rows['caft']['params'] - base['params']) / max(rows['conv3x3']['params'] - base['params'], 1):.2f}x "
          f"(paper {0.89 / 6.95:.2f}x), FLOPs {(rows['caft']['flops'] - base['flops']) / max(rows['conv3x3']['flops'] - base['flops'], 1):.2f}x "
          f"(paper {11.45 / 37.06:.2f}x)")
    print(f"whole model ({args.encoder}) CPU latency, encoder once + decoder: "
          + ", ".join(f"{v} {1000 * (enc_s + rows[v]['latency']):.0f} ms" for v in VARIANTS)
          + f"; CAFT/none {(enc_s + rows['caft']['latency']) / (enc_s + base['latency']):.3f}x "
            f"(paper 45.28/39.52 = {45.28 / 39.52:.3f}x on an RTX 2080)")
    if args.full_latency:
        print("whole model measured: " + ", ".join(f"{v} {1000 * rows[v]['full']:.0f} ms" for v in VARIANTS))

    c4 = enc.channels[0]
    m512 = caft_peak(c4, 512, args.heads, device)
    m1024 = caft_peak(c4, 1024, args.heads, device)
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "CPU dispatch probe (live activation bytes)"
    print(f"\none CAFT block at the stride-4 skip ({c4} channels), peak memory by {how}: "
          f"512^2 input {m512 / 2**20:.1f} MiB, 1024^2 input {m1024 / 2**20:.1f} MiB, ratio {m1024 / m512:.2f}x "
          f"(goal about 4x; pixel-by-pixel attention would be 16x: {(1024 // 4) ** 4 * 4 / 2**30:.0f} GiB for one "
          f"float32 (HW)^2 map at 1024^2)")
    print(f"\nbenchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
