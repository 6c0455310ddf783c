"""What the commands share: argument types and options, model loading for ``--model``/``--prompt``,
a progress heartbeat and a step timer."""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from typing import Callable

from ..benchmarks.latency import time_calls
from ..models import load_model, load_text_pipeline, prompt_embeddings, prompt_embeds_kwargs


def median_seconds(fn: Callable[[], object], device: str, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds per call (do_bench / CUDA events on GPU, perf_counter on CPU)."""
    return time_calls(fn, device, warmup=warmup, repeats=repeats, rep_ms=100)["median_s"]


def load_model_for(args, device: str, dtype):
    """``(unet, scheduler, sample_kwargs, pipeline or None)``: with ``--prompt`` the model is a
    text-to-image pipeline folder and the U-Net is conditioned on the prompt's embeddings."""
    prompt = getattr(args, "prompt", None)
    if prompt is None:
        unet, scheduler = load_model(args.model, device=device, dtype=dtype)
        return unet, scheduler, prompt_embeds_kwargs(unet, args.prompt_embeds, device, dtype), None
    if args.prompt_embeds:
        raise ValueError("pass --prompt (encoded by the pipeline's text encoder) or --prompt-embeds FILE.pt, not both")
    pipe = load_text_pipeline(args.model, device=device, dtype=dtype)
    return pipe.unet, pipe.scheduler, {"encoder_hidden_states": prompt_embeddings(pipe, prompt)}, pipe


PIPELINE_GUIDANCE = 7.5   # `sample --prompt`'s classifier-free guidance scale unless --guidance-scale


def guidance_arguments(args, pipe, default=None) -> dict:
    """``calibrate`` arguments for classifier-free guidance with a text pipeline (``--prompt``):
    the scale (``--guidance-scale``, else ``default``; none: unguided) and the empty prompt's
    embeddings as the unconditional arguments."""
    g = args.guidance_scale if getattr(args, "guidance_scale", None) is not None else default
    if pipe is None or g is None:
        return {}
    return {"guidance_scale": g, "uncond_kwargs": {"encoder_hidden_states": prompt_embeddings(pipe, "")}}


@contextlib.contextmanager
def heartbeat(label: str, every: float = 15.0, quiet: bool = False):
    """Print ``label ... Ns`` every ``every`` seconds while the block runs (long compilations)."""
    if quiet:
        yield
        return
    done = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not done.wait(every):
            print(f"{label} ... {time.perf_counter() - t0:.0f}s", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def count(minimum: int = 1):
    """argparse type: an integer >= ``minimum`` (the message names the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "count"
    return parse


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


RECIPES = ["w8a8", "w4a8", "w4a4", "ptqd", "mixed"]
