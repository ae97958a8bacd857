"""Training the lab's model: every parameter's gradient against transformers' Qwen3_5MoeForCausalLM on the same
checkpoint and batch, for every CPU lab backend that has a backward; the loss falls on a fixed batch; a saved
checkpoint loads back with the same logits; `python -m model.train` runs end to end.

The yardstick of the per-head decay parameters (A_log, dt_bias) is the float64 gradient rather than transformers':
each is a sum of dg over every token of its layer, with much cancellation, and transformers' float32 Gated
DeltaNet forms dg by autograd through g.cumsum (row minus column sums that cancel): measured on this checkpoint
(B = 2, T = 70, six batches), its A_log / dt_bias gradients lie 2e-5 to 5e-4 from the float64 ones, while the lab's
torch backward (dg summed from the pairs that hold g_t) lies 2e-6 to 8e-6 from them. Every other parameter is
checked against transformers' gradient at 1e-4.
"""
import secrets

import pytest
import torch

import kernellab
import model
from bench.peers.transformers import transformers_torch_path
from model.generate import SMALL_CONFIG, write_random_checkpoint
from model.model import OPS
from model.train import main as train_main
from model.train import next_token_loss, save_checkpoint, train, training_backends
from model.weights import to_lab_state_dict
from tests.helpers import rel_err

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # many tiny ops (conftest.py)


GRAD_TOL = 1e-4
DECAY_PARAMETERS = ("linear_attn.A_log", "linear_attn.dt_bias")
BATCH, LENGTH = 2, 40  # 40 tokens: two chunks of the CPU's 32, the second partial


def _cases():
    """(op, backend) of every CPU lab backend with a backward, the model's other ops on torch; all-reference too.
    Interpreted and simulated backends have no backward; peers are measured, not tested here."""
    cases = [pytest.param(OPS[0], "torch", id="all-torch"), pytest.param(OPS[0], "reference", id="all-reference")]
    for op in OPS:
        table = kernellab.registry.registered(op)
        for name in kernellab.backends(op, "cpu"):
            if name not in ("torch", "reference") and table[name].backward is not None and not table[name].peer:
                cases.append(pytest.param(op, name, id=f"{op}-{name}"))
    return cases


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", seed=1234)


@pytest.fixture(scope="module")
def batch_seed(request):
    """One fresh batch per run of this module (--seed replays it): transformers' and the float64 gradients are
    computed once for it."""
    value = request.config.getoption("--seed")
    return secrets.randbelow(2**31) if value is None else value


@pytest.fixture(scope="module")
def batch(batch_seed):
    return torch.randint(SMALL_CONFIG["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(batch_seed))


def _gradients(m, ids):
    """{lab parameter name: gradient} of the next-token loss of m on ids."""
    m.zero_grad(set_to_none=True)
    next_token_loss(m(ids), ids).backward()
    return {name: p.grad for name, p in m.named_parameters()}


@pytest.fixture(scope="module")
def transformers_gradients(checkpoint, batch):
    """transformers on its pure-torch Gated DeltaNet (tests/model/test_model.py explains), gradients renamed to the lab
    model's parameters (experts and fused projections as the loader fuses them)."""
    from transformers import Qwen3_5MoeForCausalLM

    with transformers_torch_path():
        hf = Qwen3_5MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        next_token_loss(hf(batch).logits, batch).backward()
    return to_lab_state_dict({name: p.grad for name, p in hf.named_parameters()}, model.ModelConfig.from_folder(
        checkpoint))


@pytest.fixture(scope="module")
def float64_gradients(checkpoint, batch):
    """The float64 model, its gated delta rule on the reference (autograd through the token loop), the other ops
    on torch (exact float64 functions, SDPA's autograd)."""
    m = model.from_pretrained(checkpoint, backend={"gated_delta_rule": "reference"}, dtype="float64")
    return _gradients(m, batch)


@pytest.mark.parametrize("op, name", _cases())
def test_every_parameter_gradient_matches_transformers(checkpoint, batch, batch_seed, transformers_gradients,
                                                       float64_gradients, op, name):
    backends = {o: "reference" if name == "reference" else name if o == op else "torch" for o in OPS}
    m = model.from_pretrained(checkpoint, backend=backends)
    grads = _gradients(m, batch)
    assert set(grads) == set(transformers_gradients)
    for param, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), f"{param}: no or non-finite gradient"
        decay = param.endswith(DECAY_PARAMETERS)
        ref = float64_gradients[param] if decay else transformers_gradients[param]
        err = rel_err(grad, ref)
        assert err <= GRAD_TOL, (f"{op}={name}: {param}'s gradient {err:.2e} from "
                                 f"{'the float64 one' if decay else 'transformers'} (batch seed {batch_seed})")


def test_transformers_decay_gradients_agree_with_float64_within_their_float32_error(transformers_gradients,
                                                                                    float64_gradients, batch_seed):
    """The decay parameters' yardstick swap is not hiding a disagreement: transformers' own gradients of them are
    near the float64 ones (float32 cancellation only), and so are all its other gradients."""
    for param, grad in transformers_gradients.items():
        tol = 2e-3 if param.endswith(DECAY_PARAMETERS) else GRAD_TOL
        err = rel_err(grad, float64_gradients[param])
        assert err <= tol, f"transformers' {param}: {err:.2e} from float64 (batch seed {batch_seed})"


def test_loss_falls_on_a_fixed_batch(checkpoint, seed):
    m = model.from_pretrained(checkpoint, backend=training_backends("torch", "cpu"))
    fixed = torch.randint(SMALL_CONFIG["vocab_size"], (24,), generator=torch.Generator().manual_seed(seed))
    # a stream of exactly one window: every step's batch is that sequence
    losses = train(m, fixed, steps=8, batch=1, seq_len=24, lr=3e-3, progress=False)
    assert losses[-1] < 0.7 * losses[0], f"loss {[round(x, 3) for x in losses]} did not fall (seed={seed})"


def test_save_load_round_trip_gives_identical_logits(checkpoint, tmp_path, seed):
    """A trained model saved with transformers' names loads back (model.from_pretrained) bit for bit."""
    import json

    m = model.from_pretrained(checkpoint, backend="torch")
    ids = torch.randint(SMALL_CONFIG["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(seed))
    train(m, ids[0], steps=2, batch=1, seq_len=20, lr=1e-2, progress=False)
    saved = save_checkpoint(m, tmp_path / "trained", json.loads((checkpoint / "config.json").read_text()))
    loaded = model.from_pretrained(saved, backend="torch")
    with torch.no_grad():
        assert torch.equal(m(ids), loaded(ids))
        assert not torch.equal(model.from_pretrained(checkpoint, backend="torch")(ids), loaded(ids))


def test_train_command_runs_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    train_main(["--checkpoint", str(checkpoint), "--backend", "torch", "--steps", "3", "--batch", "2", "--seq-len",
                "16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "loss " in printed and (out / "loss.png").stat().st_size > 0
    assert (out / "checkpoint" / "config.json").is_file()
    m = model.from_pretrained(out / "checkpoint", backend="reference")
    assert m.config.num_hidden_layers == SMALL_CONFIG["num_hidden_layers"]


def test_generate_keeps_inference_mode(checkpoint, seed):
    """generate (and a forward with a cache) run under inference_mode: no graph, whatever requires grad."""
    m = model.from_pretrained(checkpoint, backend="torch")
    ids = torch.randint(SMALL_CONFIG["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(seed))
    cache = m.new_cache(1, 8)
    assert not m(ids, cache).requires_grad
    assert m(ids).requires_grad  # without a cache the forward is differentiable
    out = m.generate(ids, 2)
    assert out.shape == (1, 7) and not out.requires_grad
