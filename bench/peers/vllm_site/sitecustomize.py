"""On the PYTHONPATH of vLLM's engine processes only (bench/peers/vllm_engine.py): torchvision's op schemas where
its library cannot load.

vLLM imports torchvision for every Qwen3.5 model (through transformers' Qwen2-VL image processor). PyPI's torchvision
is a CUDA build whose library (_C.so) cannot load into torch's CPU build; torchvision (0.28) then still registers
fake kernels of two of that library's ops, torchvision::nms and qnms, and its import fails. Defined here, their
schemas let the import through; the ops stay without kernels (a text model never calls them)."""
import importlib.util
import os

_spec = importlib.util.find_spec("torchvision")
if _spec is not None and _spec.submodule_search_locations:
    import torch

    try:
        torch.ops.load_library(os.path.join(_spec.submodule_search_locations[0], "_C.so"))
    except OSError:
        TORCHVISION = torch.library.Library("torchvision", "DEF")  # kept: a collected Library drops its schemas
        TORCHVISION.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        TORCHVISION.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
