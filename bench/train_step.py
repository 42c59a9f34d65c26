"""Throughput, peak memory and MFU of one GoldiCLIP training step, with anchors in the same run.

Measures, on synthetic device-resident batches (no data loading), bf16 autocast, AdamW (fused
on CUDA/ROCm):
  goldiclip      the full step: L_ret + distillation (teacher, G global + L local crops) +
                 the four decoder tasks (one sample per task per image) + weighting + EMA update
  goldiclip-ret  the same model with distillation and decoder off (the FLAIR-style core)
  open_clip      an open_clip ViT-B-16 CLIP step at the same batch (skipped, with a message,
                 when open_clip does not import)
MFU = (FLOPs of one step counted by torch.utils.flop_counter.FlopCounterMode, eager, recompute
included) / step time / peak bf16 matmul FLOP/s measured in this run. `--parity` first runs one
forward+backward in fp32 and in bf16 on the same batch and reports every loss of both.

    python bench/train_step.py --preset B/16 --batch 128 --captions 8 --compile --parity \
        --out bench/out/step.json --write                                                 # GPU, ~4 min
    python bench/train_step.py --preset debug --device cpu --batch 4 --captions 2 --steps 2   # smoke

A run that does not fit the GPU's memory is retried at half the batch (said in the output and
the table), so one call always comes back with figures.
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import report  # noqa: E402  (bench/report.py)
from model import IGNORE_INDEX, TASKS, GoldiCLIP, get_preset, replace_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="B/16")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--captions", type=int, default=8, help="captions per image (K)")
    parser.add_argument("--global-views", type=int, default=2)
    parser.add_argument("--local-views", type=int, default=6)
    parser.add_argument("--decoder-length", type=int, default=48,
                        help="tokens per decoder sequence (the loader pads to multiples of 16)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-distill", action="store_true")
    parser.add_argument("--no-decoder", action="store_true")
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--parity", action="store_true", help="first compare every loss under bf16 and fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-matmul-size", type=int, default=None, help="default 8192 on GPU, 512 on CPU")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--write", action="store_true", help="(re)write the train step section of BENCHMARKS.md (GPU)")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device, size: int, iterations: int = 20) -> float:
    """Achievable bf16 matmul FLOP/s on this device (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    synchronize(device)
    return 2 * size**3 * iterations / (time.perf_counter() - start)


def random_text(num: int, length: int, *, vocab: int, bos: int, eos: int, pad: int, device,
                min_length: int = 6) -> torch.Tensor:
    """(num, length) ids: BOS, random tokens, EOS at a random position, then padding."""
    ids = torch.randint(0, vocab - 2, (num, length), device=device)
    ends = torch.randint(min_length, length, (num, 1), device=device)
    positions = torch.arange(length, device=device)[None]
    ids = torch.where(positions == ends, eos, torch.where(positions > ends, pad, ids))
    ids[:, 0] = bos
    return ids


def synthetic_batch(config, args, device) -> dict[str, torch.Tensor]:
    B, K = args.batch, args.captions
    size, local, text = config.vision.image_size, config.vision.local_image_size, config.text
    special = {"vocab": text.vocab_size, "bos": text.bos_token_id, "eos": text.eos_token_id, "pad": text.pad_token_id}
    def pixels(*shape):  # uint8, as the loader ships them (the model normalises on the device)
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)

    batch = {
        "images": pixels(B, 3, size, size),
        "caption_ids": random_text(B * K, text.context_length, device=device, **special).view(B, K, -1),
    }
    if config.distill.enabled:
        batch["global_views"] = pixels(B, args.global_views, 3, size, size)
        batch["local_views"] = pixels(B, args.local_views, 3, local, local)
    if config.decoder.enabled:
        M, S = B * len(TASKS), min(args.decoder_length, text.context_length)
        ids = random_text(M, S, device=device, min_length=S // 2, **special)
        positions = torch.arange(S, device=device)[None]
        prompt_end = torch.randint(3, S // 2, (M, 1), device=device)
        eos = (ids == text.eos_token_id).int().argmax(-1, keepdim=True)
        targets = (positions >= prompt_end) & (positions < eos)
        labels = torch.where(targets, ids.roll(-1, dims=1), IGNORE_INDEX)
        batch |= {
            "decoder_input_ids": ids,
            "decoder_labels": labels,
            "decoder_image_index": torch.arange(B, device=device).repeat_interleave(len(TASKS)),
            "decoder_task": torch.arange(len(TASKS), device=device).repeat(B),
        }
    return batch


class GoldiCLIPStep:
    def __init__(self, config, args, device):
        self.model = GoldiCLIP(config).to(device)
        self.batch = synthetic_batch(config, args, device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.5,
                                           fused=device.type == "cuda")
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.device = device

    def loss(self, forward) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return forward(self.batch)[0]

    def __call__(self, forward=None) -> torch.Tensor:
        loss = self.loss(forward or self.forward)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.update_teacher()
        return loss.detach()

    def eager_step(self) -> None:
        self(self.model)


class OpenCLIPStep:
    def __init__(self, open_clip, args, device):
        self.model = open_clip.create_model("ViT-B-16").to(device)
        self.loss_fn = open_clip.ClipLoss()
        self.images = torch.randn(args.batch, 3, 224, 224, device=device)
        self.texts = random_text(args.batch, 77, vocab=49408, bos=49406, eos=49407, pad=0, device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-4, fused=device.type == "cuda")
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.device = device

    def __call__(self, forward=None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            image_features, text_features, logit_scale = (forward or self.forward)(self.images, self.texts)[:3]
            loss = self.loss_fn(image_features, text_features, logit_scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def eager_step(self) -> None:
        self(self.model)


def measure(name: str, step, args, device, peak_flops: float) -> dict:
    with FlopCounterMode(display=False) as counter:
        step.eager_step()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "run": name,
        "batch": args.batch,
        "images_per_s": args.batch / seconds,
        "step_s": seconds,
        "tflops_per_step": flops / 1e12,
        "mfu": flops / seconds / peak_flops,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": loss.float().item(),
    }
    print(json.dumps(result), flush=True)
    return result


def bf16_parity(config, args, device) -> dict:
    """Every loss of one forward+backward under bf16 autocast against fp32 on the same batch."""
    step = GoldiCLIPStep(config, args, device)
    buffers = {name: buffer.clone() for name, buffer in step.model.named_buffers()}
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)  # the same negative captions in both runs
        with torch.no_grad():  # the same distillation centers in both runs
            for name, buffer in step.model.named_buffers():
                buffer.copy_(buffers[name])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, metrics = step.model(step.batch)
        loss.backward()
        step.model.zero_grad(set_to_none=True)
        losses[str(dtype)] = {k: v.float().item() for k, v in metrics.items() if k.startswith("loss/")}
    fp32, bf16 = losses["torch.float32"], losses["torch.bfloat16"]
    relative = {k: abs(bf16[k] - fp32[k]) / max(abs(fp32[k]), 1e-6) for k in fp32}
    result = {"fp32": fp32, "bf16": bf16, "relative_difference": relative,
              "all_finite": all(torch.isfinite(torch.tensor(list(bf16.values())))),
              "max_relative_difference": max(relative.values())}
    print(json.dumps({"bf16_parity": result}), flush=True)
    return result


def timed(name: str, make_step, args, device, peak_flops: float) -> dict:
    """Build a step, measure it, then free it (compiled graphs and cached blocks too) for the next run."""
    step = make_step(args)
    try:
        return measure(name, step, args, device, peak_flops)
    finally:
        del step
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def halving_on_oom(run, args, what: str):
    """`run(args)`, retried at half the batch while the GPU runs out of memory."""
    while True:
        try:
            return run(args)
        except torch.OutOfMemoryError:
            if args.batch <= 8:
                raise
            torch.cuda.empty_cache()
            args.batch //= 2
            print(f"{what}: out of memory, retrying at batch {args.batch}", flush=True)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    peak_size = args.peak_matmul_size or (8192 if device.type == "cuda" else 512)
    peak_flops = measure_peak_flops(device, peak_size)
    print(f"peak bf16 matmul ({peak_size}^3): {peak_flops / 1e12:.3g} TFLOP/s", flush=True)

    config = get_preset(args.preset, distill={"enabled": not args.no_distill},
                        decoder={"enabled": not args.no_decoder})
    requested_batch = args.batch
    run = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "requested_batch": requested_batch,
        "peak_tflops": peak_flops / 1e12,
        "results": [],
        "bf16_parity": None,
    }
    if args.write and device.type != "cuda":
        raise SystemExit("--write records GPU runs only")

    def publish() -> None:
        """JSON and BENCHMARKS.md after every measurement: a run cut short by a time limit keeps what it has."""
        run["args"]["batch"] = args.batch
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(run, indent=2))
        if args.write and run["results"]:
            write_section(run)

    if args.parity:  # in true fp32: before TF32 is on
        parity_args = argparse.Namespace(**vars(args))
        run["bf16_parity"] = halving_on_oom(lambda a: bf16_parity(config, a, device), parity_args, "bf16 parity")
        run["bf16_parity"]["batch"] = parity_args.batch
        publish()
    torch.backends.cuda.matmul.allow_tf32 = True
    results = run["results"]
    results.append(halving_on_oom(
        lambda a: timed("goldiclip", lambda b: GoldiCLIPStep(config, b, device), a, device, peak_flops),
        args, "goldiclip"))
    publish()
    if not args.no_anchors:
        core = replace_config(config, distill={"enabled": False}, decoder={"enabled": False})
        results.append(timed("goldiclip-ret", lambda b: GoldiCLIPStep(core, b, device), args, device, peak_flops))
        publish()
        try:
            import open_clip
        except Exception as error:  # an absent package, or a broken torchvision beneath it
            print(f"open_clip anchor skipped: cannot import open_clip ({type(error).__name__}: {error})")
        else:
            make = lambda b: OpenCLIPStep(open_clip, b, device)  # noqa: E731
            results.append(timed("open_clip-ViT-B-16", make, args, device, peak_flops))
            publish()
            if args.batch < 256:  # the issue's anchor figure is at batch 256
                big = argparse.Namespace(**{**vars(args), "batch": 256})
                results.append(timed("open_clip-ViT-B-16", make, big, device, peak_flops))
                publish()


def write_section(run: dict) -> None:
    args = run["args"]
    lines = [
        "## train step", "",
        f"`bench/train_step.py`: one training step on synthetic device-resident batches (uint8 views, as the "
        f"loader ships them), preset {args['preset']}, K = {args['captions']} captions, {args['global_views']} global + "
        f"{args['local_views']} local views, one decoder sample per task per image ({args['decoder_length']} tokens), "
        f"bf16 autocast, fused AdamW, torch.compile {'on' if args['compile'] else 'off'}; {args['warmup']} untimed "
        f"then {args['steps']} timed steps. MFU = FLOPs of one step (FlopCounterMode, eager) / step time / the "
        f"bf16 matmul peak measured in the same run ({run['peak_tflops']:.0f} TFLOP/s). Anchors in the same run: "
        "the model with distillation and decoder off (goldiclip-ret) and open_clip's ViT-B-16 CLIP step "
        "(issue 3: about 1,730 images/s at batch 256, MFU 0.27-0.29 on this H100). Target for the full step: "
        "MFU >= 0.30.", "",
        "| run | batch | images/s | step ms | TFLOP/step | MFU | peak memory GiB | command | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in run["results"]:
        lines.append(f"| {r['run']} | {r['batch']} | {r['images_per_s']:,.0f} | {1000 * r['step_s']:.0f} | "
                     f"{r['tflops_per_step']:.2f} | {r['mfu']:.2f} | {r['peak_memory_gib']:.1f} | "
                     f"`{report.command_line()}` | {report.machine()} | {report.today()} |")
    if run["requested_batch"] != args["batch"]:
        lines += ["", f"Batch {run['requested_batch']} did not fit; the runs above are at batch {args['batch']}."]
    parity = run["bf16_parity"]
    if parity:
        worst = max(parity["relative_difference"], key=parity["relative_difference"].get)
        lines += ["", f"bf16 autocast vs fp32, one forward + backward on the same batch of {parity['batch']} "
                      f"(same weights, negatives and centers): every loss finite: {parity['all_finite']}; largest "
                      f"relative difference {parity['max_relative_difference']:.2e} ({worst}).", "",
                  "| loss | fp32 | bf16 | relative difference |", "| --- | --- | --- | --- |"]
        for name, value in parity["fp32"].items():
            lines.append(f"| {name} | {value:.4f} | {parity['bf16'][name]:.4f} | "
                         f"{parity['relative_difference'][name]:.1e} |")
    report.write_section("\n".join(lines))


if __name__ == "__main__":
    main()
