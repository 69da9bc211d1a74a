"""./run.sh gpu: Qwen2-VL-2B's architecture with random weights (no download) through two warm-up SFT steps
and two GRPO steps at a real-sized prompt -- an image of max_pixels (2,048 patches, 512 image tokens), G = 4,
256 new tokens -- in bf16 with gradient checkpointing, on every visible GPU (FSDP2 under torchrun when there
are several: the script restarts itself under it). It prints one table: per part of a step its seconds, its
peak memory beside what the memory arithmetic of tests/README.md (tests/memory.py) predicts for the same
settings, and the rollout's tokens per second.

    python3 tests/gpu.py [--layers N] [--vision-depth N] [--new-tokens N] [--quick]

On GPU the peak is torch.cuda.max_memory_allocated, reset as each part starts. Without a GPU the same script
runs at reduced depth (real widths, the real vocabulary) and the peak is the host memory the run added: the
peak RSS (VmHWM, reset as each part starts, after glibc returns its freed memory) over the RSS before the
models were loaded. --quick is the tests' short form (seconds): one decoder layer and one vision block at
small widths, the real vocabulary, a small image, 8 tokens; its figures are no measurement.

It needs torch and transformers only (and what they bring: PIL, tokenizers; torchvision for the image
processor): no hub, no data set. The tokenizer is tests/tiny.py's, trained on the spot; the model keeps the
real vocabulary (151,936), and the sampled tokens past the tokenizer's 512 decode to nothing, which the
rewards score 0. Without qwen-vl-utils, data.py gets a stand-in built on transformers' own smart_resize. It
prints the versions it ran on; what the project needs that they lack ends the run in one line.
"""

import argparse
import ctypes
import functools
import gc
import importlib
import inspect
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import types

import torch
import transformers as tf
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# --quick: Qwen2-VL-2B's layout at small widths (head 16, its rotary sections 2:3:3), the real vocabulary
QUICK_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
QUICK_TEXT["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
QUICK_VISION = dict(embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
# the parts of a step, in the table's order (grpo_vl's functions start them: see metered())
SFT_PARTS = ["encode", "update", "optimizer", "stats"]
RL_PARTS = ["rollout", "rewards", "reference", "update", "optimizer", "stats"]


# ============================================================================ what the machine has
def fetch_image(ele, image_patch_size=14):
    """qwen_vl_utils.fetch_image for what data.py passes (a PIL image or a path, min_pixels, max_pixels): the
    image resized to the multiples of patch x merge (28 px) that smart_resize picks, as qwen-vl-utils does."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image = ele["image"]
    if isinstance(image, str):
        image = Image.open(image.removeprefix("file://"))
    image = image.convert("RGB")
    factor = image_patch_size * 2  # the 2 x 2 merge
    h, w = smart_resize(image.height, image.width, factor, ele["min_pixels"], ele["max_pixels"])
    return image.resize((w, h))


def stand_in_for_qwen_vl_utils():
    """data.py imports qwen_vl_utils.fetch_image; when the package is missing, a module holding the function
    above takes its place. Returns whether it did."""
    try:
        importlib.import_module("qwen_vl_utils")
        return False
    except ImportError:
        sys.modules["qwen_vl_utils"] = types.SimpleNamespace(fetch_image=fetch_image)
        return True


def missing():
    """What this torch and transformers lack of what the project uses, in one line (None: nothing). Checked
    before any model is built, so that such a machine fails in seconds."""
    if not tf.utils.is_torchvision_available():
        return "torchvision is missing: transformers' Qwen2-VL image processor needs it"
    try:
        importlib.import_module("grpo_vl")  # its torch imports: FSDP2, distributed checkpoints
    except ImportError as e:
        return f"grpo_vl.py cannot be imported: {e}"
    if not hasattr(tf, "Qwen2VLForConditionalGeneration") or not hasattr(tf, "AutoModelForImageTextToText"):
        return "transformers has no Qwen2VLForConditionalGeneration or AutoModelForImageTextToText"
    forward = inspect.signature(tf.Qwen2VLForConditionalGeneration.forward).parameters
    for name in ("mm_token_type_ids", "logits_to_keep"):  # grpo_vl.token_logprobs passes both
        if name not in forward:
            return f"Qwen2-VL's forward takes no {name} (grpo_vl.token_logprobs passes it)"
    if not hasattr(tf.PreTrainedModel, "activation_checkpointing_enable"):
        return "transformers models have no activation_checkpointing_enable (grpo_vl.load_models calls it)"
    return None


def versions():
    """One line: what this run runs on."""
    line = f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {tf.__version__}"
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())})
        return line + f", CUDA {torch.version.cuda}: {torch.cuda.device_count()} x {' / '.join(names)}"
    return line + f", no GPU: CPU, {torch.get_num_threads()} threads"


# ============================================================================ the model folder and the data
def write_model(folder, opts, device):
    """Qwen2-VL-2B's config at the run's depth (and --quick's widths), random weights (seeded), saved in bf16
    as the hub's are, with tests/tiny.py's tokenizer and processor: a folder grpo_vl.load_models loads."""
    import memory
    import tiny

    processor = tiny.build(layers=1)[1]  # its byte-level BPE tokenizer, trained on the spot (a few seconds)
    ids = processor.tokenizer.convert_tokens_to_ids
    special = dict.fromkeys(["bos_token_id", "eos_token_id", "pad_token_id"], ids("<|endoftext|>"))
    vision = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"))
    vision.update(vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    text = {**special, **(QUICK_TEXT if opts.quick else {})}
    widths = QUICK_VISION if opts.quick else None
    config = memory.qwen2_vl_2b(opts.layers, opts.vision_depth, text, widths, **vision, **special)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast: on the GPU when there is one
        model = tf.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    tf.utils.logging.disable_progress_bar()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def picture(max_pixels):
    """An image of 2k x k tiles of 28 px (a 2 x 2 merge of patches) that fills max_pixels: 896 x 448 px for
    401,408 (2,048 patches), drawn in memory."""
    k = math.isqrt(max_pixels // (2 * 28 * 28))
    image = Image.new("RGB", (56 * k, 28 * k), (245, 245, 245))
    d = ImageDraw.Draw(image)
    d.ellipse((4 * k, 4 * k, 20 * k, 20 * k), fill=(220, 40, 40))
    d.rectangle((30 * k, 6 * k, 46 * k, 22 * k), fill=(40, 80, 220))
    return image


def padded(tok, text, n):
    """`text` with one-token words put at its {pad} until it is n tokens long, or as it is if it is longer
    (the byte-level pre-tokenizer splits at spaces: a word never merges with its neighbours)."""
    word = " step"
    count = len(tok(text.format(pad=""), add_special_tokens=False)["input_ids"])
    return text.format(pad=word * max(n - count, 0))


def example(processor, opts):
    """The run's row, as data.py's examples are: the picture, a question, and a step-wise solution whose SFT
    target is --new-tokens tokens with its closing EOS. (The prompt is P3, R1-VL's; the tokenizer's 512-token
    vocabulary spells its text in 227 tokens, where the README counts 150.)"""
    ex = dict(images=[picture(opts.max_pixels)], answer="2", choices=None, task="Count", source="synthetic")
    ex.update(key_steps=[["2"]], question="How many shapes are in the image?")
    solution = "### Step 1: I count the shapes.{pad}\n### The final answer is: 2"
    ex["solution"] = padded(processor.tokenizer, solution, opts.new_tokens - 1)  # + the closing EOS
    return ex


def shapes_of(processor, ex, args):
    """(prompt tokens, image patches, SFT target tokens with the EOS) of the run's row."""
    import data

    prompt = data.encode(processor, [ex], "step", args.max_pixels)
    target = processor.tokenizer(data.sft_target(ex, "step"), add_special_tokens=False)["input_ids"]
    return prompt["input_ids"].shape[1], int(prompt["image_grid_thw"].prod()), len(target) + 1


# ============================================================================ measuring
class Meter:
    """Splits the steps into named parts: each part's seconds in each step, its peak memory over all steps.
    enter(name) ends the running part (if any) and starts `name`; step() ends a step."""

    def __init__(self, device):
        self.device = device
        self.phase = ""  # "SFT" or "RL": the parts are "SFT update", "RL update", ...
        self.name = None
        self.libc = ctypes.CDLL(None) if device.type == "cpu" else None
        self.reset_peak()
        self.baseline = status("VmRSS") if device.type == "cpu" else 0  # the run adds to the RSS before it
        self.seconds = []  # per step: {part: seconds}
        self.peak = {}  # part -> bytes, the largest over the steps
        self.current = {}

    def enter(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.name is not None:
            self.current[self.name] = self.current.get(self.name, 0.0) + now - self.start
            self.peak[self.name] = max(self.peak.get(self.name, 0), self.peak_bytes())
        self.reset_peak()
        self.name = f"{self.phase} {name}".strip() if name else None
        self.start = time.perf_counter()

    def step(self):
        self.enter(None)
        self.seconds.append(self.current)
        self.current = {}

    def peak_bytes(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return status("VmHWM") - self.baseline

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # glibc keeps freed blocks under 32 MB for reuse (CUDA's caching allocator does the same, and
        # max_memory_allocated does not count them): returned first, so that a part starts from its live
        # memory. Then the peak RSS is reset to the RSS now (Linux: 5 written to clear_refs).
        if hasattr(self.libc, "malloc_trim"):
            self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def status(field):
    """A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def metered(g, meter):
    """grpo_vl's functions wrapped so that each call starts its part (grpo_step and sft look them up by name
    at each call). sft() saves a checkpoint at its last step: a run's business, not this script's."""
    rollout, token_logprobs, clip_and_step = g.rollout, g.token_logprobs, g.clip_and_step
    sft_batch = g.sft_batch

    def timed_rollout(*args, **kwargs):
        meter.enter("rollout")
        out = rollout(*args, **kwargs)
        # one process: autocast's bf16 copies of the weights are the rollout's; its context frees them as soon
        # as this returns, which the next part would count as its own
        torch.clear_autocast_cache()
        meter.enter("rewards")  # decoding the completions, scoring them, their advantages
        return out

    def timed_logprobs(*args, **kwargs):
        meter.enter("update" if torch.is_grad_enabled() else "reference")  # update: forward and backward
        return token_logprobs(*args, **kwargs)

    def timed_clip_and_step(*args, **kwargs):
        meter.enter("optimizer")  # the gradient norm clipped, AdamW's step
        out = clip_and_step(*args, **kwargs)
        meter.enter("stats")  # the step's statistics, the schedule
        return out

    def timed_sft_batch(*args, **kwargs):
        meter.enter("encode")  # an SFT batch: images resized, prompts and targets tokenized
        return sft_batch(*args, **kwargs)

    g.rollout, g.token_logprobs, g.clip_and_step = timed_rollout, timed_logprobs, timed_clip_and_step
    g.sft_batch = timed_sft_batch
    g.save_checkpoint = g.ignore


# ============================================================================ the run
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, help="decoder layers (default: 28 on GPU, 1 on CPU)")
    p.add_argument("--vision-depth", type=int, help="vision blocks (default: 32 on GPU, 1 on CPU)")
    p.add_argument("--new-tokens", type=int, default=256, help="every completion's length, the SFT target's")
    p.add_argument("--num-generations", type=int, default=4, help="G: completions per prompt")
    p.add_argument("--max-pixels", type=int, default=401408, help="the image's size (2,048 patches)")
    p.add_argument("--quick", action="store_true", help="the tests' short form, in seconds")
    opts = p.parse_args(argv)
    if opts.quick:  # 1 layer, 1 block at small widths, a 112 x 56 image (32 patches), 8 new tokens
        opts.layers, opts.vision_depth, opts.new_tokens, opts.max_pixels = 1, 1, 8, 6272
    gpu = torch.cuda.is_available()
    opts.layers = opts.layers or (28 if gpu else 1)
    opts.vision_depth = opts.vision_depth or (32 if gpu else 1)
    return opts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = parse(argv)
    sys.path[:0] = [ROOT, HERE]
    stood_in = stand_in_for_qwen_vl_utils()
    if problem := missing():
        fail(problem, 2)
    if "WORLD_SIZE" not in os.environ and torch.cuda.device_count() > 1:  # every GPU: under torchrun
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        torchrun.append(f"--nproc_per_node={torch.cuda.device_count()}")
        os.execv(sys.executable, [*torchrun, __file__, *argv])
    try:
        measure(opts, stood_in)
    except Exception as e:  # one line, the traceback in a file
        path = os.path.join(tempfile.gettempdir(), f"grpo-vl-gpu-traceback-{os.getpid()}.txt")
        open(path, "w").write(traceback.format_exc())
        fail(f"{type(e).__name__}: {(str(e) or '?').splitlines()[0]} (traceback: {path})", 1)


def fail(message, status):
    """The run ends in one line, naming the versions."""
    where = f"torch {torch.__version__}, transformers {tf.__version__}"
    print(f"gpu.py: error: {message} ({where})", file=sys.stderr, flush=True)
    raise SystemExit(status)


def measure(opts, stood_in):
    import grpo_vl as g

    rank, world, device, mesh = g.init_distributed()
    log = functools.partial(print, flush=True) if rank == 0 else g.ignore
    log(f"gpu.py: {versions()}")
    if stood_in:
        log("gpu.py: no qwen-vl-utils: data.py resizes images with a stand-in (transformers' smart_resize)")
    workdir = [tempfile.mkdtemp(prefix="grpo-vl-gpu-") if rank == 0 else None]  # rank 0's, for every rank
    if world > 1:
        g.dist.broadcast_object_list(workdir)
    try:
        steps(opts, g, workdir[0], rank, world, device, mesh, log)
    finally:  # the model folder, also when the run failed
        if rank == 0:
            shutil.rmtree(workdir[0], ignore_errors=True)


def steps(opts, g, workdir, rank, world, device, mesh, log):
    """The run in the folder `workdir`: the model written by rank 0 and loaded; two SFT steps, two RL steps,
    each part measured; the table."""
    import rewards as R

    folder = os.path.join(workdir, "model")
    t0 = time.perf_counter()
    if rank == 0:
        write_model(folder, opts, device)
    g.barrier()
    log(f"gpu.py: wrote {folder} in {time.perf_counter() - t0:.0f} s")
    flags = ["--variant", "stepgrpo", "--model", folder, "--data", "-", "--sft-data", "-"]  # the data: below
    flags += ["--sft-epochs", "2", "--out", os.path.join(workdir, "out"), "--log-completions-every", "0"]
    flags += ["--sft-batch", str(4 * world), "--micro-batch", "4", "--prompts-per-step", str(world)]
    flags += ["--num-generations", str(opts.num_generations), "--max-new-tokens", str(opts.new_tokens)]
    flags += ["--max-pixels", str(opts.max_pixels), "--precision", "bf16", "--gradient-checkpointing"]
    args = g.parse_args(flags)
    gc.collect()
    meter = Meter(device)
    metered(g, meter)
    # ---- load: the fp32 policy and the reference, on the device (sharded under torchrun)
    meter.enter("load")
    run = g.load_models(args, rank, world, device, mesh)
    meter.step()
    run.model.generation_config.min_new_tokens = args.max_new_tokens  # every completion real-sized
    ex = example(run.processor, opts)
    # ---- two warm-up SFT steps of 4 examples per rank; the reference is then the model they leave (main())
    meter.phase = "SFT"
    g.sft([dict(ex, row=i) for i in range(args.sft_batch)], args, run, None, lambda stats: meter.step(), log)
    if run.ref is not None:
        run.ref.load_state_dict(run.model.state_dict())
    gc.collect()
    # ---- two GRPO steps of one prompt per rank (main()'s optimizer and schedule)
    meter.phase = "RL"
    run.rewards = {name: R.REWARDS[name] for name in args.rewards.split(",")}
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=args.lr, weight_decay=0.0)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda s: 1 - s / 2)
    for step in (1, 2):
        stats, _ = g.grpo_step(step, [dict(ex, row=rank)], args, run)
        meter.step()
        tokens = stats["completion_len"] * args.num_generations * world  # every rank's completions
        times = f"{stats['step_time']:.1f} s, rollout {stats['rollout_time']:.1f} s"
        log(f"rl {step}/2 | {times}, {tokens:.0f} tokens")
    # ---- the table: the peaks are the largest over the ranks, the seconds rank 0's
    peaks = torch.tensor(list(meter.peak.values()), dtype=torch.float64, device=device)
    if world > 1:
        g.dist.all_reduce(peaks, op=g.dist.ReduceOp.MAX)
    peaks = dict(zip(meter.peak, peaks.tolist()))
    if rank == 0:
        shapes = shapes_of(run.processor, ex, args)
        params = sum(p.numel() for p in run.model.parameters())  # a DTensor counts its whole parameter
        print(header(run.model.config, params, shapes, args, opts, world, device))
        predicted = predict(run.model.config, params, shapes, args, world, device)
        print(table(meter.seconds, peaks, predicted, tokens / stats["rollout_time"]))
    g.barrier(finish=True)


def predict(config, params, shapes, args, world, device):
    """tests/memory.py's arithmetic of each part, in bytes per device: the states every part holds (weights,
    gradients, AdamW's moments, the reference), plus the part's own term."""
    import memory

    m = memory.dims(config, params)
    prompt, patches, target = shapes
    foreach = device.type == "cuda"  # AdamW's multi-tensor step; on CPU its loop over the parameters
    examples, G, C = args.sft_batch // world, args.num_generations, args.max_new_tokens
    n = min(args.micro_batch, examples)  # SFT: an image per example
    sft = memory.terms(m, prompt + target, patches, examples, n, True, world, n, n * target, foreach)
    n = min(args.micro_batch, G)  # RL: one image per micro-batch (vision sharing)
    rl = memory.terms(m, prompt + C, patches, G, n, True, world, 1, n * C, foreach)
    states = rl["states"] + rl["reference"]
    out = {"load": rl["load"]}
    own = {"update": "update", "optimizer": "optimizer", "rollout": "rollout", "reference": "score"}
    for part in SFT_PARTS:
        out[f"SFT {part}"] = states + (sft[own[part]] if part in own else 0)
    for part in RL_PARTS:
        out[f"RL {part}"] = states + (rl[own[part]] if part in own else 0)
    out["SFT step"] = states + max(sft["update"], sft["optimizer"])  # its largest part
    out["RL step"] = states + max(rl["rollout"], rl["score"], rl["update"], rl["optimizer"])
    return out


def header(config, params, shapes, args, opts, world, device):
    prompt, patches, target = shapes
    text = config.text_config
    where = (
        f"{world} GPU(s), peak: torch.cuda.max_memory_allocated" if device.type == "cuda" else "CPU, peak:"
    )
    if device.type == "cpu":
        where += " the host memory the run added (peak RSS over the RSS before the models)"
    return (
        f"\nQwen2-VL-2B's architecture, decoder layers: {text.num_hidden_layers}, vision blocks: "
        f"{config.vision_config.depth}, width {text.hidden_size}, vocabulary "
        f"{text.vocab_size:,}: {params:,} parameters, random weights; bf16, gradient checkpointing; {where}\n"
        f"prompt {prompt} tokens ({patches} patches, {patches // 4} image tokens); SFT: "
        f"{args.sft_batch // world} examples per rank of {target} target tokens; RL: 1 prompt per rank, "
        f"G = {args.num_generations}, {args.max_new_tokens} new tokens; micro-batch {args.micro_batch}\n"
        "seconds: the second step of each phase; peak: the largest over both steps (and over the ranks)"
    )


def table(seconds, peaks, predicted, tokens_per_s):
    """A row per part: its seconds in the phase's second step and their share of the step, its peak beside
    the prediction; a row per phase: the step's seconds, its largest peak beside the arithmetic's largest."""
    lines = ["part             seconds  of step   peak GB  predicted GB  measured/predicted  tokens/s"]

    def row(name, s, share, peak, pred, rate=""):
        share = f"{share:.0%}" if share is not None else "-"
        cells = f"{s:8.3f} {share:>8} {peak / 1e9:9.3f} {pred / 1e9:13.3f} {peak / pred:19.2f} {rate:>9}"
        lines.append(f"{name:14} {cells}".rstrip())

    row("load", seconds[0]["load"], None, peaks["load"], predicted["load"])
    for phase, parts, last in (("SFT", SFT_PARTS, seconds[2]), ("RL", RL_PARTS, seconds[4])):
        total = sum(last.values())
        for part in parts:
            name = f"{phase} {part}"
            rate = f"{tokens_per_s:.0f}" if name == "RL rollout" else ""
            row(name, last[name], last[name] / total, peaks[name], predicted[name], rate)
        top = max(peaks[f"{phase} {part}"] for part in parts)
        row(f"{phase} step", total, 1.0, top, predicted[f"{phase} step"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
