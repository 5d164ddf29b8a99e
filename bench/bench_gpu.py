"""GPU (and CPU) speed of IHF-Harmony at 1 mm: inference seconds per volume, training slices per second.

    .venv/bin/python bench/bench_gpu.py                 # every device this machine has
    .venv/bin/python bench/bench_gpu.py --device cpu    # the CPU only

What it measures, on each device:

- inference: :func:`~ihf_bids.harmonize.harmonize_volume` on the MNI152 2009a T1 at 1 mm with a
  source- and a target-site profile (the normal path; batch size the function's default: 8 on
  the CPU, what fits in free memory on CUDA, where it runs in float16 autocast), median of
  ``--repeats`` runs after one warm-up run;
- training: ``train_model`` steps on 2.5D windows of 1 mm volumes of two "sites" (the template
  and a contrast-changed copy), batch ``--train-batch`` (32 on CUDA as in the paper, 8 on the
  CPU), timed as the difference between a run of 1 + N steps and a run of 1 step;
- the work of one training slice, counted on the CPU in float32: FLOPs (torch's
  FlopCounterMode: convolutions and matrix products of the flow, VGG19 and the loss) and the
  bytes every operator reads and writes (no fusion: an upper bound on memory traffic);
- the machine's own limits, measured: a large float32 (CPU) or float16 (CUDA) matrix product
  and a large device-to-device copy; with the datasheet peaks of known GPUs beside them;
- on CUDA, the CPU and GPU outputs of the same model on the same volume: max and mean absolute
  difference inside the brain.

The network is the default architecture (FlowConfig()) with seeded random weights unless
``--model DIR`` names a trained one (timings do not depend on the weights; the CPU/GPU
difference does somewhat). Results are merged by device into docs/benchmark-gpu.json and
rendered to docs/benchmark-gpu.md, so runs on different machines add up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: Datasheet peaks (dense float16/bfloat16 tensor-core FLOP/s, float32 FLOP/s, memory bytes/s).
GPU_PEAKS = {
    "H200": {"fp16_flops": 989e12, "fp32_flops": 67e12, "bandwidth": 4.8e12},
    "H100 NVL": {"fp16_flops": 835e12, "fp32_flops": 60e12, "bandwidth": 3.9e12},
    "H100 PCIe": {"fp16_flops": 756e12, "fp32_flops": 51e12, "bandwidth": 2.0e12},
    "H100": {"fp16_flops": 989e12, "fp32_flops": 67e12, "bandwidth": 3.35e12},
    "A100": {"fp16_flops": 312e12, "fp32_flops": 19.5e12, "bandwidth": 2.0e12},
    "L40S": {"fp16_flops": 362e12, "fp32_flops": 91.6e12, "bandwidth": 0.864e12},
    "A10": {"fp16_flops": 125e12, "fp32_flops": 31.2e12, "bandwidth": 0.6e12},
    "V100": {"fp16_flops": 125e12, "fp32_flops": 15.7e12, "bandwidth": 0.9e12},
}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def describe_device(device: str) -> dict:
    """The device's name and, for the CPU, the model that lscpu reports."""
    import torch

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    peaks=next((v for k, v in GPU_PEAKS.items() if k in props.name), None))
    else:
        fields = {}
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
            fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
        except (OSError, subprocess.SubprocessError):
            pass
        model = fields.get("Model name", "unknown")
        info.update(name=f"{model}, {os.cpu_count()} cores", cpu_model=model, cores=os.cpu_count(),
                    threads=torch.get_num_threads(), cpu_family=fields.get("CPU family"),
                    cpu_model_number=fields.get("Model"), hypervisor=fields.get("Hypervisor vendor"),
                    avx512="avx512f" in fields.get("Flags", ""))
    return info


def measured_limits(device: str) -> dict:
    """A large matrix product (FLOP/s) and a large copy (bytes/s) on the device."""
    import torch

    cuda = device.startswith("cuda")
    n = 8192 if cuda else 2048
    dtype = torch.float16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    repeats = 20 if cuda else 3
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    _sync(device)
    flops = 2 * n**3 * repeats / (time.perf_counter() - t)
    x = torch.empty(256 * 2**20 if cuda else 64 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    _sync(device)
    bandwidth = 2 * x.numel() * repeats / (time.perf_counter() - t)  # read + write
    return {"matmul_flops": flops, "matmul_dtype": str(dtype).replace("torch.", ""), "copy_bytes_per_s": bandwidth}


class Setup:
    """The template volume, a contrast-changed 'other site', the network and two site profiles."""

    def __init__(self, model_dir: str | None, profile_device: str) -> None:
        import torch

        from ihf_bids.harmonize import load_model
        from ihf_bids.harmonize.profile import build_target_profile
        from ihf_bids.model import FlowConfig, IHFHarmony, load_vgg19
        from ihf_bids.templates import load_template

        tpl = load_template(1.0)
        self.mask = tpl.brain_mask > 0.5
        self.volume = (tpl.t1 * self.mask).astype(np.float32)
        # "site b": a smooth contrast change (gamma) and a different scale
        peak = float(np.percentile(self.volume[self.mask], 99))
        self.other = (1800.0 * (self.volume / peak).clip(0) ** 1.6 * self.mask).astype(np.float32)
        if model_dir:
            self.model, _ = load_model(model_dir)
            self.model_source = str(model_dir)
        else:
            torch.manual_seed(0)
            self.model = IHFHarmony(FlowConfig()).eval()
            self.model_source = "FlowConfig() default architecture, seeded random weights (seed 0)"
        self.architecture = self.model.config.to_dict()
        self.vgg = load_vgg19()
        vgg = self.vgg.to(profile_device)
        t = time.perf_counter()
        self.profiles = {
            site: build_target_profile([(vol, self.mask, None, site)], site=site, modality="T1w", vgg=vgg,
                                       device=profile_device)
            for site, vol in (("a", self.volume), ("b", self.other))
        }
        self.profile_seconds = time.perf_counter() - t
        self.vgg.to("cpu")


def bench_inference(setup: Setup, device: str, repeats: int) -> tuple[dict, np.ndarray]:
    import torch

    from ihf_bids.harmonize import harmonize_volume

    model = setup.model.to(device)
    times, out = [], None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):  # the first run warms up (allocator, cuDNN algorithm choice)
        _sync(device)
        t = time.perf_counter()
        out = harmonize_volume(setup.other, model, setup.profiles["a"], source_profile=setup.profiles["b"],
                               mask=setup.mask, device=device)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t)
    result = {"shape": list(setup.volume.shape), "seconds": times, "median_s": statistics.median(times),
              "repeats": repeats}
    if device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    setup.model.to("cpu")
    return result, out


def _bank(setup: Setup):
    from ihf_bids.train import SliceBank, TrainingVolume

    rng = np.random.default_rng(0)
    volumes = []
    for subject in range(2):  # two 'subjects': the volume with a little noise
        for site, vol in (("a", setup.volume), ("b", setup.other)):
            noisy = vol + rng.normal(0, 0.01 * float(vol[setup.mask].mean()), vol.shape).astype(np.float32) * setup.mask
            volumes.append(TrainingVolume(noisy.clip(0), site, "T1w", str(subject), mask=setup.mask))
    return SliceBank(volumes)


def _train_dir(setup: Setup, root: Path) -> Path:
    """A training directory with the two profiles in place (train_model reuses them)."""
    from ihf_bids.harmonize.profile import profile_filename

    (root / "profiles").mkdir(parents=True, exist_ok=True)
    for site, profile in setup.profiles.items():
        profile.save(root / "profiles" / profile_filename(site, "T1w"))
    return root


def bench_training(setup: Setup, device: str, batch: int, steps: int) -> dict:
    """Seconds for ``steps`` training steps (a run of 1 + steps minus a run of 1 step)."""
    from ihf_bids.train import TrainConfig, train_model

    bank = _bank(setup)
    setup.vgg.to(device)
    durations = {}
    with tempfile.TemporaryDirectory(prefix="ihf-bench-gpu-") as tmp:
        for n in (1, 1 + steps):
            config = TrainConfig(steps=n, batch_size=batch, learning_rate=1e-4, seed=0, checkpoint_every=10**6,
                                 device=device, architecture=setup.architecture)
            out = _train_dir(setup, Path(tmp) / f"run{n}")
            _sync(device)
            t = time.perf_counter()
            train_model(bank, config, out, resume=False, progress=False, vgg=setup.vgg)
            _sync(device)
            durations[n] = time.perf_counter() - t
    seconds = max(durations[1 + steps] - durations[1], 1e-9)
    return {"batch": batch, "steps": steps, "seconds": seconds, "seconds_per_step": seconds / steps,
            "slices_per_s": batch * steps / seconds, "window": list(bank.window(0, bank.shape[2] // 2).shape)}


def count_work_per_slice(setup: Setup, batch: int = 2) -> dict:
    """FLOPs and unfused operator bytes of one training step, per slice (CPU, float32)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from ihf_bids.train import TrainConfig, train_model

    class ByteCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in (*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else (out,))):
                if isinstance(value, torch.Tensor):
                    self.bytes += value.numel() * value.element_size()
            return out

    bank = _bank(setup)
    setup.vgg.to("cpu")
    config = TrainConfig(steps=1, batch_size=batch, learning_rate=1e-4, seed=0, device="cpu",
                         architecture=setup.architecture)
    with tempfile.TemporaryDirectory(prefix="ihf-bench-gpu-") as tmp:
        with FlopCounterMode(display=False) as flops:
            train_model(bank, config, _train_dir(setup, Path(tmp) / "flops"), resume=False, progress=False,
                        vgg=setup.vgg)
        counter = ByteCounter()
        with counter:
            train_model(bank, config, _train_dir(setup, Path(tmp) / "bytes"), resume=False, progress=False,
                        vgg=setup.vgg)
    return {"flops_per_slice": flops.get_total_flops() / batch, "bytes_per_slice_unfused": counter.bytes / batch,
            "counted_with_batch": batch}


def compare_cpu_gpu(cpu_out: np.ndarray, gpu_out: np.ndarray, mask: np.ndarray) -> dict:
    diff = np.abs(cpu_out - gpu_out)[mask]
    scale = float(np.percentile(np.abs(cpu_out[mask]), 99.5))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "p99_abs": float(np.percentile(diff, 99)),
            "robust_range": scale, "max_rel_to_range": float(diff.max()) / scale,
            "mean_rel_to_range": float(diff.mean()) / scale}


def _fmt(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "n/a"
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}".rstrip()


def _threads(run: dict) -> str:
    threads = run["device"].get("threads")
    return f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""


def write_markdown(path: Path, results: dict) -> None:
    runs = results["runs"]
    lines = [
        "# GPU and CPU speed at 1 mm (bench/bench_gpu.py)",
        "",
        "Inference: `harmonize_volume` on the MNI152 2009a T1 at 1 mm (197 x 233 x 189) with source and "
        "target site profiles, median over repeats after a warm-up run. Training: `train_model` steps on "
        "2.5D windows (3 x 200 x 236) of 1 mm volumes. Default architecture (FlowConfig()); "
        "see the script's docstring for the method.",
        "",
        "| device | inference s / 1 mm volume | training slices / s (batch) | s / step | measured matmul | measured copy |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(runs):
        run = runs[key]
        inf, tr, lim = run.get("inference"), run.get("training"), run.get("limits", {})
        lines.append(
            f"| {run['device']['name']}{_threads(run)} ({run['device']['device']}) | "
            f"{inf['median_s']:.2f} | {tr['slices_per_s']:.3g} ({tr['batch']}) | {tr['seconds_per_step']:.3g} | "
            f"{_fmt(lim.get('matmul_flops'), 'FLOP/s')} {lim.get('matmul_dtype', '')} | "
            f"{_fmt(lim.get('copy_bytes_per_s'), 'B/s')} |")
    if not any(k.startswith("cuda") for k in runs):
        lines += ["| GPU | not measured: no GPU on the machine of this run | | | | |"]
    work = results.get("work_per_slice")
    if work:
        lines += [
            "",
            "## Work of one training slice",
            f"{_fmt(work['flops_per_slice'], 'FLOP')} per slice (forward and backward of the flow, two VGG19 "
            f"passes and the backward through one, the loss); {_fmt(work['bytes_per_slice_unfused'], 'B')} read "
            "and written by the operators one by one (float32, no fusion: an upper bound on memory traffic). "
            f"Arithmetic intensity of that bound: {work['flops_per_slice'] / work['bytes_per_slice_unfused']:.1f} "
            "FLOP/B.",
            "",
            "| device | achieved FLOP/s in training | share of the measured matmul | share of the datasheet peak "
            "(fp16 tensor) | traffic bound at this speed | share of the measured copy | share of the datasheet bandwidth |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in sorted(runs):
            run = runs[key]
            speed = run["training"]["slices_per_s"]
            achieved, traffic = speed * work["flops_per_slice"], speed * work["bytes_per_slice_unfused"]
            lim, peaks = run.get("limits", {}), run["device"].get("peaks") or {}

            def share(x, ref):
                return f"{100 * x / ref:.1f} %" if ref else "n/a"

            lines.append(
                f"| {run['device']['name']}{_threads(run)} | {_fmt(achieved, 'FLOP/s')} | {share(achieved, lim.get('matmul_flops'))} | "
                f"{share(achieved, peaks.get('fp16_flops'))} | {_fmt(traffic, 'B/s')} | "
                f"{share(traffic, lim.get('copy_bytes_per_s'))} | {share(traffic, peaks.get('bandwidth'))} |")
    gpu_runs = {k: r for k, r in runs.items() if k.startswith("cuda")}
    lines += ["", "## Target: a 1 mm volume in under 1 s on an H100-class GPU", ""]
    if gpu_runs:
        for key, run in sorted(gpu_runs.items()):
            median = run["inference"]["median_s"]
            lines.append(f"- {run['device']['name']}: {median:.3f} s per 1 mm volume "
                         f"({'met' if median < 1 else 'not met'}).")
    else:
        lines.append("- Not measured on the machine of these runs (no GPU). The script is ready: "
                     "`python bench/bench_gpu.py` on a machine with CUDA adds the GPU rows, the FLOP and "
                     "bandwidth shares and the CPU/GPU comparison to this page.")
    comparisons = [(k, r["cpu_vs_gpu"]) for k, r in sorted(runs.items()) if r.get("cpu_vs_gpu")]
    lines += ["", "## CPU and GPU results", ""]
    if comparisons:
        for key, c in comparisons:
            lines.append(
                f"- {runs[key]['device']['name']}: the same model and volume harmonized on the CPU (float32) and the "
                f"GPU (float16 autocast) differ inside the brain by at most {c['max_abs']:.4g} and on average "
                f"{c['mean_abs']:.4g} (99th percentile {c['p99_abs']:.4g}); relative to the output's robust range "
                f"({c['robust_range']:.4g}): {100 * c['max_rel_to_range']:.3f} % at most, "
                f"{100 * c['mean_rel_to_range']:.4f} % on average. Close, not bit-identical.")
    else:
        lines.append("- Not measured: it needs a machine with a GPU (the script compares the two when CUDA is present).")
    busy = [r for r in runs.values() if r["device"]["device"] == "cpu"
            and max(r.get("load_average_1min", [0])) > (r["device"].get("cores") or 1)]
    if busy:
        lines += ["", "## Remarks", "",
                  "- The CPU runs shared their machine with other CPU-heavy processes (the load averages below "
                  "exceed the core count), so the CPU figures are below what an idle machine gives, and two torch "
                  "threads were slower than one (compare the rows above); on a quieter machine the same 1 mm inference took 4.5 s with 2 threads "
                  "(docs/benchmark-core.md)."]
    lines += ["", "## Runs", ""]
    for key in sorted(runs):
        run = runs[key]
        dev = run["device"]
        cpu = (f" (lscpu: family {dev.get('cpu_family')}, model {dev.get('cpu_model_number')}, "
               f"{'AVX-512, ' if dev.get('avx512') else ''}{dev.get('hypervisor') or 'no'} hypervisor)"
               if dev["device"] == "cpu" and dev.get("cpu_family") else "")
        lines.append(f"- `{key}`: {run['date']}, `{run['command']}`; {run['device']['name']}{cpu}, torch "
                     f"{run['device']['torch']}; network: {run['model']}; profiles built in {run['profile_s']:.0f} s; "
                     f"wall time {run['wall_s']:.0f} s; load average (1 min) before and after: "
                     f"{', '.join(map(str, run.get('load_average_1min', ['n/a'])))}.")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the CPU, and CUDA when present")
    parser.add_argument("--model", help="a trained model directory's network (e.g. models/NAME/anat)")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference runs (after one warm-up)")
    parser.add_argument("--cpu-train-steps", type=int, default=2)
    parser.add_argument("--cpu-train-batch", type=int, default=8)
    parser.add_argument("--gpu-train-steps", type=int, default=20)
    parser.add_argument("--gpu-train-batch", type=int, default=32)
    parser.add_argument("--out-prefix", default=str(ROOT / "docs" / "benchmark-gpu"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json, measure nothing")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's, the number of cores)")
    args = parser.parse_args(argv)
    if args.render_only:
        write_markdown(Path(args.out_prefix + ".md"), json.loads(Path(args.out_prefix + ".json").read_text()))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.monotonic()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA GPU visible")
    devices = (["cpu"] if args.device != "cuda" else []) + (["cuda"] if cuda else [])
    setup = Setup(args.model, "cuda" if cuda else "cpu")
    out_json = Path(args.out_prefix + ".json")
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": {}}
    outputs, new = {}, {}
    for device in devices:
        info = describe_device(device)
        print(f"[{device}] {info['name']}", flush=True)
        inference, outputs[device] = bench_inference(setup, device, args.repeats)
        print(f"[{device}] inference {inference['median_s']:.2f} s per 1 mm volume", flush=True)
        batch, steps = ((args.gpu_train_batch, args.gpu_train_steps) if device == "cuda"
                        else (args.cpu_train_batch, args.cpu_train_steps))
        training = bench_training(setup, device, batch, steps)
        print(f"[{device}] training {training['slices_per_s']:.3g} slices/s (batch {batch})", flush=True)
        key = f"{device}: {info['name']}" + (_threads({"device": info}) if device == "cpu" else "")
        new[key] = {"device": info, "inference": inference, "training": training, "limits": measured_limits(device),
                    "model": setup.model_source, "profile_s": setup.profile_seconds,
                    "date": time.strftime("%Y-%m-%d", time.gmtime()),
                    "command": "python bench/bench_gpu.py " + shlex.join(argv if argv is not None else sys.argv[1:])}
    if "cuda" in outputs and "cpu" in outputs:
        new[next(k for k in new if k.startswith("cuda"))]["cpu_vs_gpu"] = compare_cpu_gpu(
            outputs["cpu"], outputs["cuda"], setup.mask)
    results["work_per_slice"] = count_work_per_slice(setup)
    wall = time.monotonic() - started
    for run in new.values():
        run["wall_s"] = wall
        run["load_average_1min"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]  # before, after
    results["runs"].update(new)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(Path(args.out_prefix + ".md"), results)
    print(f"wrote {out_json} and {args.out_prefix}.md in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
