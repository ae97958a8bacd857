"""Expert parallelism's exchange (bench/suites/moe_dispatch/): a sweep of its own, in processes of its own."""
from bench.ops import MODELS, OpSpec, vary
from bench.suites import moe_dispatch as moe_dispatch_suite


def _dispatch_grid(scale):
    """kernellab.distributed's exchange against tokens per rank N, hidden size D and top-k around a base shape, and
    skewed routing at the base, at each world size: 2 and 4 processes on CPU (1 too in the quick sweep, the
    exchange with nothing to send away: what a one-GPU machine runs), 1 to 8 GPUs on a GPU machine
    (bench.suites.moe_dispatch runs the worlds the machine has GPUs for)."""
    if scale == "cuda":
        worlds, base = (1, 2, 4, 8), dict(N=4096, D=4096, E=256, I=512, top_k=8, routing="uniform")
        axes = dict(N=(128, 512, 2048, 4096, 16384), D=(2048, 4096, 7168), top_k=(1, 2, 4, 8, 10))
    elif scale == "cpu":
        worlds, base = (2, 4), dict(N=1024, D=1024, E=64, I=256, top_k=8, routing="uniform")
        axes = dict(N=(64, 256, 1024, 4096), D=(512, 1024, 2048, 4096), top_k=(1, 2, 4, 8))
    else:
        worlds, base = (1, 2, 4), dict(N=256, D=256, E=16, I=64, top_k=4, routing="uniform")
        axes = dict(N=(16, 256, 1024), D=(128, 256, 512), top_k=(1, 4, 8))
    shapes = []
    for world in worlds:
        at = dict(world=world) | base
        shapes += [s for axis, values in axes.items() for s in vary(at, axis, values)]
        shapes += vary(at, "routing", ("uniform", "skewed"))
    return shapes


def _dispatch_presets(scale):
    """The MoE shapes of Qwen3.5 at 4096 tokens per rank: Qwen3.5-35B-A3B on 2 CPU processes (the issue's target;
    the grid has 4); both Qwen3.5 models on 1 to 8 GPUs."""
    models, worlds = (("Qwen3.5-35B-A3B",), (2,)) if scale == "cpu" else \
        (("Qwen3.5-35B-A3B", "Qwen3.5-397B-A17B"), (1, 2, 4, 8))
    return [(model, dict(world=world, N=4096, D=MODELS[model]["hidden"], E=MODELS[model]["experts"],
                         I=MODELS[model]["expert_size"], top_k=MODELS[model]["top_k"], routing="uniform"))
            for model in models for world in worlds]


# Expert parallelism's exchange (bench/suites/moe_dispatch/): dispatch and combine against all_to_all_single, moe_ep against
# kernellab.moe in one process, in processes of its own; --backend names the moe_permute / moe_unpermute backend of
# the exchange and the moe backend of the local experts (each name for the ops it has).
MOE_DISPATCH = OpSpec("moe_dispatch", ("world", "N", "D", "E", "I", "top_k", "routing"), grid=_dispatch_grid,
                      presets=_dispatch_presets, sweep=moe_dispatch_suite, backend_ops=("moe_permute", "moe"))


SPECS = (MOE_DISPATCH,)
