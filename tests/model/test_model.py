"""The lab's Qwen3.5-MoE model against transformers' Qwen3_5MoeForCausalLM on the same random checkpoint.

Every CPU backend of every op the model calls (gated_delta_rule, attention, route, moe) is run in turn,
the other ops on the reference backend: logits within 1e-4 relative error in float32, identical greedy
tokens, and prefill-then-decode equal to one full forward. Backends that reach the CPU only through the
numba.cuda simulator are left out (a whole model through the simulator takes minutes; their own test
files run them at tiny sizes). Then the loader's formats and errors.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernellab
import model
from bench.peers.transformers import transformers_torch_path
from model.generate import SMALL_CONFIG, write_random_checkpoint
from model.model import OPS
from tests.helpers import rel_err

LOGITS_TOL = 1e-4
PROMPT_LEN = 70  # more than one 64-token chunk, and not a multiple of it
NEW_TOKENS = 6


def _cpu_cases(interpreted: bool):
    cases = [pytest.param(OPS[0], "reference", id="all-reference")]
    for op in OPS:
        registered = kernellab.registry.registered(op)
        for name in kernellab.backends(op, "cpu"):
            places = registered[name].places
            if name == "reference" or places == ("cuda", "cudasim") or (not interpreted and "interpret" in places) \
                    or torch.float32 not in registered[name].dtypes:  # the model runs float32 here
                continue
            cases.append(pytest.param(op, name, id=f"{op}-{name}"))
    return cases


CASES = _cpu_cases(interpreted=True)
# Triton under TRITON_INTERPRET=1 takes 30-90 s per generate on 2 CPU cores: interpreted backends run the
# logits check (which covers their chunked path) and leave greedy decoding and the cache check to GPU runs.
CASES_DECODE = _cpu_cases(interpreted=False)


@pytest.fixture(autouse=True)
def inference():
    """Every test here is inference: the model's forward outside generate is differentiable (tests/model/test_train.py
    trains it), and backends without a backward refuse calls whose weights require grad."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", seed=1234)


@pytest.fixture(scope="module")
def torch_path_calls():
    """transformers on its pure-torch Gated DeltaNet (fla's GPU kernels fail on CPU), counting the calls."""
    with transformers_torch_path({}) as calls:
        yield calls


@pytest.fixture(scope="module")
def hf_model(checkpoint, torch_path_calls):
    from transformers import Qwen3_5MoeForCausalLM

    return Qwen3_5MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _ids(seed, batch=2, length=PROMPT_LEN):
    return torch.randint(SMALL_CONFIG["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _load(checkpoint, op, name):
    """The model with `name` for op and the reference backend for the other ops."""
    return model.from_pretrained(checkpoint, backend={o: name if o == op else "reference" for o in OPS})


def test_transformers_runs_its_torch_path(hf_model, torch_path_calls, seed):
    before = dict(torch_path_calls)
    with torch.no_grad():
        hf_model(_ids(seed, length=5))
        hf_model.generate(_ids(seed, length=3), max_new_tokens=2, do_sample=False)
    assert torch_path_calls.get("torch_chunk_gated_delta_rule", 0) > before.get("torch_chunk_gated_delta_rule", 0)
    assert torch_path_calls.get("torch_recurrent_gated_delta_rule", 0) > before.get(
        "torch_recurrent_gated_delta_rule", 0)


@pytest.mark.parametrize("op, name", CASES)
def test_logits_match_transformers(checkpoint, hf_model, op, name, seed):
    m = _load(checkpoint, op, name)
    assert m.backends[op] == name
    ids = _ids(seed)
    with torch.no_grad():
        ref = hf_model(ids).logits
    out = m(ids)
    assert out.shape == (2, PROMPT_LEN, SMALL_CONFIG["vocab_size"]) and torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= LOGITS_TOL, f"{op}={name}: logits relative error {err:.2e} > {LOGITS_TOL} (seed={seed})"


@pytest.mark.parametrize("op, name", CASES_DECODE)
def test_greedy_tokens_match_transformers(checkpoint, hf_model, op, name, seed):
    m = _load(checkpoint, op, name)
    ids = _ids(seed, batch=1)
    ours = m.generate(ids, NEW_TOKENS)
    with torch.no_grad():
        theirs = hf_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    assert ours.shape == (1, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(ours[:, :PROMPT_LEN], ids)
    assert torch.equal(ours, theirs), f"{op}={name}: ours {ours[:, PROMPT_LEN:].tolist()} != transformers' " \
                                      f"{theirs[:, PROMPT_LEN:].tolist()} (seed={seed})"


@pytest.mark.parametrize("op, name", CASES_DECODE)
def test_prefill_then_decode_equals_full_forward(checkpoint, op, name, seed):
    """Two chunked prefills (the second continues the conv, recurrent and KV state) and then single-token
    decode steps give the logits of one forward over the whole sequence."""
    m = _load(checkpoint, op, name)
    ids = _ids(seed, length=PROMPT_LEN + 3)
    full = m(ids)
    cache = m.new_cache(2, ids.shape[1])
    pieces = [m(ids[:, :40], cache), m(ids[:, 40:PROMPT_LEN], cache)]
    pieces += [m(ids[:, t:t + 1], cache) for t in range(PROMPT_LEN, ids.shape[1])]
    assert cache.position == ids.shape[1]
    err = rel_err(torch.cat(pieces, dim=1), full)
    assert err <= LOGITS_TOL, f"{op}={name}: cached logits differ from the full forward by {err:.2e} (seed={seed})"


def test_prefill_is_chunked_and_decode_recurrent(checkpoint, seed):
    m = model.from_pretrained(checkpoint, backend="reference")
    ops = m.layers[0].linear_attn.ops  # one namespace, shared by every layer
    modes = []
    inner = ops.gated_delta_rule

    def spy(*args, **kwargs):
        modes.append(kwargs["mode"])
        return inner(*args, **kwargs)

    ops.gated_delta_rule = spy
    m.generate(_ids(seed, batch=1, length=9), 3)
    linear_layers = SMALL_CONFIG["num_hidden_layers"] * 3 // 4
    assert modes == ["chunk"] * linear_layers + ["recurrent"] * 2 * linear_layers


def test_cache_size_does_not_grow_for_linear_attention(checkpoint):
    m = model.from_pretrained(checkpoint, backend="reference")
    short, long = m.new_cache(1, 16), m.new_cache(1, 1024)
    kinds = m.config.layer_types
    for kind, a, b in zip(kinds, short.states, long.states):
        size = [sum(t.numel() for t in vars(s).values()) for s in (a, b)]
        assert (size[0] == size[1]) == (kind == "linear_attention")
    assert long.nbytes() > short.nbytes()


def test_generate_zero_new_tokens(checkpoint, seed):
    m = model.from_pretrained(checkpoint, backend="reference")
    ids = _ids(seed, batch=1, length=5)
    assert torch.equal(m.generate(ids, 0), ids)


def test_dtype_argument(checkpoint, seed):
    m = model.from_pretrained(checkpoint, backend="reference", dtype="bfloat16")
    assert m.embed_tokens.weight.dtype == torch.bfloat16 and m.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16
    assert m(_ids(seed, batch=1, length=5)).dtype == torch.bfloat16


# ---- checkpoint formats ---------------------------------------------------------------------------------

def _copy(checkpoint, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(checkpoint, folder)
    return folder


def _rewrite(folder, edit):
    """Apply edit(tensors) to the single-file checkpoint in folder."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _same_logits(folder, checkpoint, seed):
    ids = _ids(seed, batch=1, length=9)
    ref = model.from_pretrained(checkpoint, backend="reference")(ids)
    assert rel_err(model.from_pretrained(folder, backend="reference")(ids), ref) == 0.0


def test_tied_embeddings(tmp_path, torch_path_calls, seed):
    """tie_word_embeddings: the LM head is the embedding matrix (save_pretrained stores it once)."""
    from transformers import Qwen3_5MoeForCausalLM

    folder = write_random_checkpoint(tmp_path / "tied", seed=seed, tie_word_embeddings=True)
    hf = Qwen3_5MoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = _ids(seed, batch=1, length=9)
    with torch.no_grad():
        ref = hf(ids).logits
    m = model.from_pretrained(folder, backend="reference")
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()
    assert rel_err(m(ids), ref) <= LOGITS_TOL


def test_sharded_checkpoint(checkpoint, tmp_path, seed):
    from transformers import Qwen3_5MoeForCausalLM

    folder = tmp_path / "sharded"
    Qwen3_5MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).save_pretrained(folder,
                                                                                          max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    _same_logits(folder, checkpoint, seed)


def test_multimodal_checkpoint_text_part(checkpoint, tmp_path, seed):
    """model_type qwen3_5_moe: the text config under text_config, tensors under model.language_model.,
    vision and multi-token-prediction tensors ignored."""
    folder = _copy(checkpoint, tmp_path)
    text = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": text,
                                                    "tie_word_embeddings": False}))

    def to_multimodal(tensors):
        for name in list(tensors):
            if name.startswith("model."):
                tensors["model.language_model." + name[len("model."):]] = tensors.pop(name)
        tensors["model.visual.patch_embed.proj.weight"] = torch.zeros(2, 2)
        tensors["mtp.fc.weight"] = torch.zeros(2, 2)

    _rewrite(folder, to_multimodal)
    _same_logits(folder, checkpoint, seed)


def test_per_expert_checkpoint(checkpoint, tmp_path, seed):
    """Experts stored one by one (experts.{e}.gate_proj / up_proj / down_proj) are stacked on load."""
    folder = _copy(checkpoint, tmp_path)
    I = SMALL_CONFIG["moe_intermediate_size"]

    def split_experts(tensors):
        for name in [n for n in tensors if n.endswith("mlp.experts.gate_up_proj")]:
            prefix = name.removesuffix("gate_up_proj")
            gate_up, down = tensors.pop(name), tensors.pop(prefix + "down_proj")
            for e in range(gate_up.shape[0]):
                tensors[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :I].clone()
                tensors[f"{prefix}{e}.up_proj.weight"] = gate_up[e, I:].clone()
                tensors[f"{prefix}{e}.down_proj.weight"] = down[e].clone()

    _rewrite(folder, split_experts)
    _same_logits(folder, checkpoint, seed)


# ---- loader errors --------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.from_pretrained(tmp_path / "nowhere")


def test_missing_config(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        model.from_pretrained(folder)


def test_missing_weights_and_pickle_refused(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        model.from_pretrained(folder)


def test_index_names_a_missing_shard(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        model.from_pretrained(folder)


def test_unknown_model_type(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        model.from_pretrained(folder)


def test_missing_tensor(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    _rewrite(folder, lambda t: t.pop("model.layers.1.linear_attn.A_log"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.linear_attn\.A_log"):
        model.from_pretrained(folder)


def test_misshapen_tensor(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)

    def shrink(tensors):
        tensors["model.layers.3.self_attn.k_proj.weight"] = tensors["model.layers.3.self_attn.k_proj.weight"][:-1]

    _rewrite(folder, shrink)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight.*model\.safetensors.*shape"):
        model.from_pretrained(folder)


def test_unexpected_tensor(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    _rewrite(folder, lambda t: t.__setitem__("model.layers.0.linear_attn.in_proj_qkvz.weight", torch.zeros(1)))
    with pytest.raises(ValueError, match="in_proj_qkvz"):
        model.from_pretrained(folder)


def test_unknown_backend(checkpoint):
    with pytest.raises(ValueError, match="no_such_backend"):
        model.from_pretrained(checkpoint, backend="no_such_backend")
    with pytest.raises(ValueError, match="unknown op"):
        model.from_pretrained(checkpoint, backend={"softmax": "torch"})
