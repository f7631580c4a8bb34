"""The traced UNet call against the eager forward, on the mini world's UNet: time per call and bit equality.

    python -m benchmarks.traced_calls [--repeats 50] [--threads 1]

The four calls the recipe makes (`recare.models.traced_calls.predict_noise`): the roll-out's guided pair (batch 2,
no gradients), textual inversion's forward and backward to the text embeddings (batch 1), the ESD/stage-2
student's forward and backward to its trained weights (batch 1, noxattn), and the probe's batch of 16 guided
images (batch 32, no gradients). Each row times both sides interleaved and reports each side's fastest
repeat (other processes' load only ever adds time), then checks that the outputs and gradients are equal bit for
bit. The trace is made before timing starts (about 0.5 s per input shape, once per model and shape).
"""

from __future__ import annotations

import argparse
import os

from recare.runtime import set_process_defaults

if __name__ == "__main__":
    set_process_defaults()

import time  # noqa: E402

import torch  # noqa: E402


def timed(fn) -> tuple[float, object]:
    """One call of fn: (milliseconds, its result)."""
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1000, out


def rows(unet, repeats: int):
    from recare.models import traced_calls
    from recare.models.traced_calls import predict_noise

    traced_calls.TRACE_AFTER = 0     # trace each shape at its first call, before timing starts

    g = torch.Generator().manual_seed(0)
    channels, size = unet.config.in_channels, unet.config.sample_size
    width = unet.config.cross_attention_dim

    def noise(batch):
        return torch.randn(batch, channels, size, size, generator=g), torch.randn(batch, 77, width, generator=g)

    def eager(u, x, t, h):
        return u(x, t, encoder_hidden_states=h).sample

    pair, pair_h = noise(2)
    big, big_h = noise(32)
    one, one_h = noise(1)
    t_pair, t_one = torch.tensor(981), torch.tensor([500])

    def rollout(call):
        with torch.inference_mode():
            return call(unet, pair, t_pair, pair_h)

    def probe(call):
        with torch.inference_mode():
            return call(unet, big, t_pair, big_h)

    def inversion(call):
        h = one_h.clone().requires_grad_(True)
        call(unet, one, t_one, h).pow(2).mean().backward(inputs=[h])
        return h.grad

    trained = [p for n, p in unet.named_parameters() if "attn2" not in n]

    def student(call):
        for p in trained:
            p.grad = None
        call(unet, one, t_one, one_h).pow(2).mean().backward(inputs=trained)
        return torch.cat([p.grad.flatten() for p in trained])

    for name, fn in (("roll-out pair (b2, no grad)", rollout), ("TI step (b1, grad to text)", inversion),
                     ("student step (b1, grad to weights)", student), ("probe (b32, no grad)", probe)):
        unet.requires_grad_(False)
        for p in trained if fn is student else []:
            p.requires_grad_(True)
        fn(predict_noise)                      # trace and check this shape before timing
        if not all(isinstance(t, torch.nn.Module) for t in traced_calls._TRACES[unet].by_signature.values()):
            raise SystemExit(f"{name}: the call was not traced (see recare.models.traced_calls)")
        best_eager = best_traced = float("inf")
        for _ in range(repeats):
            ms, a = timed(lambda: fn(eager))
            best_eager = min(best_eager, ms)
            ms, b = timed(lambda: fn(predict_noise))
            best_traced = min(best_traced, ms)
        yield name, best_eager, best_traced, torch.equal(a, b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from recare.models import load_pipeline

    unet = load_pipeline("mini-world", device="cpu", dtype="fp32").unet
    print(f"mini world UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters), CPU, "
          f"{args.threads} thread(s), fastest of {args.repeats}")
    print(f"| call | eager ms | traced ms | saved | equal bit for bit |\n|---|---|---|---|---|")
    for name, e, t, same in rows(unet, args.repeats):
        print(f"| {name} | {e:.2f} | {t:.2f} | {100 * (1 - t / e):.0f}% | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
