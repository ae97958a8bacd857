"""llama.cpp as the model's CPU peer: the bench checkpoint converted to GGUF (F32, and Q8_0 as a second row) with
llama.cpp's own converter, run through llama-cpp-python at the lab's thread count; prefill and decode timed like
the lab's runners (bench/suites/model/), greedy tokens and the prompt's logits compared with the lab model's.

Needs the optional extra `pip install -e ".[llama]"` (llama-cpp-python, built from source: about 12 minutes on 2
cores) and the converter, which the wheel does not carry: the package's source (`pip download --no-deps
--no-binary :all: llama-cpp-python==VERSION`, unpacked) at $LLAMA_CPP_SOURCE, or unpacked into
~/.cache/qwen35-kernel-lab/. Without them the sweep records why, in a row per runner, and goes on.

Two things the converter needs told: the random checkpoints' home-made byte-level BPE has a pre-tokenizer whose
hash it does not know (it is GPT-2's regex, so "gpt-2" is declared; the comparison feeds token ids anyway), and
--no-mtp (the checkpoints have no multi-token-prediction head). llama.cpp also requires equal key and value head
dims in the linear-attention layers, which the model sweep's config has.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import model

# runner name -> the GGUF type it loads
RUNNERS = {"llama.cpp-f32": "f32", "llama.cpp-q8_0": "q8_0"}
PARITY_PROMPT = 128  # tokens of the prompt whose logits are compared
PARITY_NEW = 64  # greedy tokens compared
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen35-kernel-lab"
# Runs llama.cpp's converter with the BPE pre-tokenizer of the random checkpoints declared: argv after the
# source folder are the converter's own.
CONVERT = """
import sys
source = sys.argv[1]
sys.path.insert(0, source)
sys.argv = [source + "/convert_hf_to_gguf.py", *sys.argv[2:]]
import convert_hf_to_gguf
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
convert_hf_to_gguf.main()
"""


def converter() -> Path | None:
    """The folder holding llama.cpp's convert_hf_to_gguf.py (vendor/llama.cpp of the llama-cpp-python source)."""
    roots = [os.environ["LLAMA_CPP_SOURCE"]] if os.environ.get("LLAMA_CPP_SOURCE") else []
    roots += sorted(glob.glob(str(CACHE_ROOT / "llama_cpp_python-*")), reverse=True)
    for root in roots:
        for folder in (Path(root), Path(root) / "vendor" / "llama.cpp"):
            if (folder / "convert_hf_to_gguf.py").is_file():
                return folder
    return None


def unavailable() -> str | None:
    """Why llama.cpp cannot run here (None when it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return ("llama-cpp-python is not installed (the optional extra: pip install -e '.[llama]', a build from "
                "source of about 12 minutes on 2 cores)")
    if converter() is None:
        return ("llama.cpp's convert_hf_to_gguf.py was not found: unpack the llama-cpp-python source (pip download "
                "--no-deps --no-binary :all: llama-cpp-python) into ~/.cache/qwen35-kernel-lab/ or point "
                "LLAMA_CPP_SOURCE at it")
    return None


def gguf_path(checkpoint: Path, outtype: str) -> Path:
    return Path(checkpoint) / f"llama-{outtype}.gguf"


def convert(checkpoint: Path, outtype: str) -> Path:
    """checkpoint (a Hugging Face folder) -> its GGUF of `outtype` beside it, by llama.cpp's converter."""
    out = gguf_path(checkpoint, outtype)
    run = subprocess.run([sys.executable, "-c", CONVERT, str(converter()), str(checkpoint), "--outtype", outtype,
                          "--outfile", str(out), "--no-mtp"], capture_output=True, text=True, timeout=1800)
    if run.returncode != 0 or not out.is_file():
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed: {lines[-1] if lines else run.returncode}")
    return out


def prepare(paths: dict[str, Path]) -> dict[tuple[str, str], str]:
    """Convert each checkpoint ({variant: folder}) to every GGUF type of RUNNERS. Returns {(variant, runner): why}
    for each runner that cannot run."""
    why = unavailable()
    skipped = {}
    for variant, path in paths.items():
        # llama-cpp-python 0.3.36 aborts loading a qwen35moe GGUF without any linear-attention layer (the
        # all-attention twin: GGML_ASSERT(buffer) in ggml-backend.cpp, every run of the sweep until 8 December 2026)
        twin = "linear_attention" not in model.ModelConfig.from_folder(path).layer_types
        for name, outtype in RUNNERS.items():
            if twin:
                skipped[variant, name] = ("not run: llama.cpp (llama-cpp-python 0.3.36) aborts loading a qwen35moe "
                                          "checkpoint without linear-attention layers (GGML_ASSERT(buffer))")
            elif why is None:
                try:
                    convert(path, outtype)
                    continue
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    skipped[variant, name] = str(exc)[:300]
            else:
                skipped[variant, name] = why
            print(f"  {name:>14} {variant:>13}: skipped: {skipped[variant, name]}", flush=True)
    return skipped


class Runner:
    """Prefill and decode of a GGUF through llama-cpp-python (its defaults but the context length and the
    threads: batches of 512 tokens, an F16 KV cache)."""

    def __init__(self, checkpoint: Path, outtype: str, threads: int, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf_path(checkpoint, outtype)), n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, logits_all=logits_all, verbose=False)
        self.vocab = self.llm.n_vocab()

    def last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.vocab,)).copy()

    def prefill(self, ids: torch.Tensor):
        """ids [1, T] from an empty context; the last position's logits."""
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return self.last_logits(), self.llm

    def decode(self, token: torch.Tensor, cache, position: int):
        """One step after the tokens so far (a recurrent state cannot be rewound: repeated steps extend the
        context by the timer's repeats)."""
        self.llm.eval(token[0].tolist())
        return self.last_logits()

    @staticmethod
    def cache_bytes(cache):
        return None


def parity_rows(checkpoint: Path, variant: str, shape: str, names: list[str], threads: int) -> list[dict]:
    """Each llama.cpp runner against the lab model (backend "auto") on one checkpoint: the relative error of the
    logits of a PARITY_PROMPT-token prompt, and PARITY_NEW greedy tokens; where they diverge, the gap between
    the lab's top two logits there (a divergence is a tie only below 1e-4). Runs in a process of its own."""
    import model

    torch.set_num_threads(threads)
    m = model.from_pretrained(checkpoint)
    prompt = torch.randint(m.config.vocab_size, (1, PARITY_PROMPT), generator=torch.Generator().manual_seed(7))
    ours_logits = m(prompt)[0].double()
    ours = m.generate(prompt, PARITY_NEW, eos_token_id=None)[0, PARITY_PROMPT:].tolist()
    rows = []
    for name in names:
        row = dict(op="model", backend=name, peer=True, device="cpu", dtype="float32", shape=shape, variant=variant,
                   phase="parity", context=PARITY_PROMPT, threads=threads)
        try:
            runner = Runner(checkpoint, RUNNERS[name], threads, PARITY_PROMPT + PARITY_NEW + 8, logits_all=True)
            runner.llm.eval(prompt[0].tolist())
            theirs_logits = torch.from_numpy(runner.llm.scores[:PARITY_PROMPT].copy()).double()
            theirs = []
            for _ in range(PARITY_NEW):
                theirs.append(int(np.argmax(runner.last_logits())))
                runner.llm.eval([theirs[-1]])
        except Exception as exc:  # a runner that fails gets its error in its row
            rows.append(row | dict(error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        row |= dict(rel_err=float((theirs_logits - ours_logits).norm() / ours_logits.norm()),
                    tokens_equal=same is None, divergence="")
        if same is not None:  # the lab's logits at the step where the two first differ
            top2 = m(torch.tensor([prompt[0].tolist() + ours[:same]]))[0, -1].double().topk(2).values
            row["divergence"] = f"at new token {same}: lab top-2 logit gap {float(top2[0] - top2[1]):.2e}"
        rows.append(row)
        print(f"  {name:>14} {variant:>13} parity: logits rel err {row['rel_err']:.2e}, greedy tokens "
              f"{'identical' if same is None else row['divergence']}", flush=True)
    return rows
