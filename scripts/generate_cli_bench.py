"""Decoding speed as users meet it: `gpt2jax generate` against transformers' `generate`,
each a whole fresh process, GPT-2 small's shape, batch 1, greedy, float32.

For each side the command runs for two lengths of new tokens; the difference in wall
time over the difference in tokens is the decode rate a user gets, and what the shorter
command spends besides is its fixed cost (start-up, imports, loading, compiling). Our
side runs twice per length: with the compile cache off (a first run) and with a warm
cache (every later run with the same shapes). Sides and lengths alternate, best of
--repeats. In the same rounds, `gpt2jax bench --decode` times the decoder inside one warm
process on the same shape (its `decode.jax_tokens_per_sec`), so the report also says how
close the command comes to the in-process rate. Needs torch and transformers (the test
extra).

    python scripts/generate_cli_bench.py [--model DIR] [--short 32] [--long 160]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPT = "The meaning of life is"
HF_SCRIPT = """
import sys, torch
from transformers import AutoTokenizer, GPT2LMHeadModel
torch.set_num_threads(int(sys.argv[3]))
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
x = tok(sys.argv[4], return_tensors="pt")
n = int(sys.argv[2])
with torch.inference_mode():
    out = model.generate(**x, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         pad_token_id=tok.eos_token_id)
print(tok.decode(out[0, x["input_ids"].shape[1]:]))
"""


def random_gpt2_small(path: str) -> None:
    """GPT-2 small's shape with random weights (seed 0) and the GPT-2 tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2jax.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_decode_rate(tokens: int, env: dict) -> tuple[float, float]:
    """The in-process decode rate of `gpt2jax bench --decode` on GPT-2 small's shape (its
    one training step is kept as short as the bench allows), and the matmul probe's FLOP/s
    it measured (the machine's speed at the time, for the record)."""
    out = subprocess.run(
        [sys.executable, "-m", "gpt2jax", "bench", "--preset", "gpt2", "--batch-size", "1",
         "--seq-len", "32", "--steps", "1", "--warmup", "1", "--rounds", "1", "--decode",
         "--decode-tokens", str(tokens), "--json"],
        env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    return result["decode"]["jax_tokens_per_sec"], result["peak_flops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a transformers GPT-2 directory (default: random GPT-2 small)")
    ap.add_argument("--short", type=int, default=32)
    ap.add_argument("--long", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gpt2jax-genbench-")
    model = args.model or os.path.join(tmp, "gpt2-small")
    if not args.model:
        random_gpt2_small(model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cache = os.path.join(tmp, "xla")
    threads = str(os.cpu_count() or 1)

    def ours(n: int) -> list[str]:
        return [sys.executable, "-m", "gpt2jax", "generate", "--model", model, "--prompt",
                PROMPT, "--greedy", "--max-new-tokens", str(n)]

    sides = {
        "gpt2jax, first run": (ours, {**env, "GPT2JAX_COMPILE_CACHE": "off"}),
        "gpt2jax, cached": (ours, {**env, "GPT2JAX_COMPILE_CACHE": cache}),
        "transformers": (lambda n: [sys.executable, "-c", HF_SCRIPT, model, str(n), threads,
                                    PROMPT], env),
    }
    for n in (args.short, args.long):  # fill the cache for both lengths
        timed(sides["gpt2jax, cached"][0](n), sides["gpt2jax, cached"][1])
    best: dict[tuple[str, int], float] = {}
    bench_rates: list[tuple[float, float]] = []
    for _ in range(args.repeats):
        for name, (cmd, side_env) in sides.items():
            for n in (args.short, args.long):
                t = timed(cmd(n), side_env)
                best[name, n] = min(best.get((name, n), t), t)
        bench_rates.append(bench_decode_rate(args.long, sides["gpt2jax, cached"][1]))
    result = {"model": model, "prompt": PROMPT, "short": args.short, "long": args.long,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sides": {}}
    for name in sides:
        short, long = best[name, args.short], best[name, args.long]
        rate = (args.long - args.short) / (long - short)
        result["sides"][name] = {"short_s": round(short, 2), "long_s": round(long, 2),
                                 "decode_tokens_per_s": round(rate, 1),
                                 "fixed_s": round(short - args.short / rate, 2)}
    hf = result["sides"]["transformers"]["decode_tokens_per_s"]
    bench = max(rate for rate, _ in bench_rates)
    result["bench_decode_tokens_per_s"] = round(bench, 1)
    result["matmul_probe_gflops"] = [round(peak / 1e9) for _, peak in bench_rates]
    for side in result["sides"].values():
        side["decode_ratio"] = round(side["decode_tokens_per_s"] / hf, 2)
        side["of_bench_decode"] = round(side["decode_tokens_per_s"] / bench, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
