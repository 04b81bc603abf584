"""Phase 2's frozen prefix: a model cut in two at a stage boundary.

With `unfreeze = N` (not "all"), phase 2 trains the backbone's last N stages and the head; the
stages before them stay frozen and in eval mode, so, like the whole backbone in phase 1, they
are a pure function of the image. Their output per training view is cached on disk
(src/features.py, entries in float16) and phase 2 trains the suffix (the model after the cut)
on it: no training image is decoded, augmented or run through the frozen stages again in any
epoch of any trial of the same augmentation level and depth (the trial's confusion matrix and
mistakes come from one pass of the whole model over the validation images). Results match running the whole model on
the same views (up to float16 rounding of the stored activations; tests/test_prefix.py).

The cut is made on the model's torch.fx graph (torchvision's own tracer, as
`create_feature_extractor` does): both halves are GraphModules that hold the model's own
modules, so training the suffix trains the model. A model that does not split cleanly (a skip
connection across the cut, a trace that changes what the model computes) is never cut: its
phase 2 runs on images, as before.
"""
from __future__ import annotations

import inspect
import logging
import math

import numpy as np
import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer

from . import model as M

log = logging.getLogger("tlsweep")

# torchvision.ops modules (StochasticDepth, SqueezeExcitation, ...) stay calls to the module, so
# their train/eval behaviour is decided when they run, not baked in when traced (torchvision's
# feature extraction does the same).
LEAVES = [cls for _, cls in inspect.getmembers(torchvision.ops, inspect.isclass) if issubclass(cls, nn.Module)]
STORED_AS = np.float16  # the cached outputs: half float32's disk; ample for activations (3 significant digits)
FP16_LIMIT = 60_000.0  # float16's largest value is 65,504: a prefix with valid outputs near it is not cached
# (phase 2 runs on images); a train view's outputs beyond it are clipped, counted and warned of (src/features.py)


def cut_for(model: nn.Module, unfreeze: str | int) -> str | None:
    """The last block that `model.unfreeze(model, unfreeze)` (src/model.py) leaves frozen (its output is what
    the trained stages see), or None when everything trains."""
    if unfreeze == "all":
        return None
    found = M.stages(model)
    return found[len(found) - int(unfreeze) - 1][-1]


def _trace(model: nn.Module) -> tuple[fx.Graph, dict]:
    tracer = NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=LEAVES)
    graph = tracer.trace(model)
    return graph, tracer.node_to_qualname


def _last_node(graph: fx.Graph, names: dict, cut: str) -> fx.Node:
    inside = [n for n in graph.nodes if names.get(n) == cut or str(names.get(n, "")).startswith(cut + ".")]
    if not inside:
        raise ValueError(f"no node of {cut!r} in the traced graph")
    return inside[-1]


def _module(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    gm = fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def split(model: nn.Module, cut: str) -> tuple[fx.GraphModule, fx.GraphModule] | None:
    """(prefix, suffix) with `suffix(prefix(x)) == model(x)`: the prefix ends with block `cut`'s
    output, the suffix starts from it; both hold `model`'s modules (no copy). None where the
    model cannot be cut there (something after the cut reads more than the cut's output)."""
    try:
        graph, names = _trace(model)
        last = _last_node(graph, names, cut)
        prefix_graph, remap = fx.Graph(), {}
        prefix_graph.graph_copy(graph, remap)  # every node but the output ...
        prefix_graph.output(remap[last])        # ... which returns the cut's value instead
        prefix = _module(model, prefix_graph)
        with graph.inserting_before(next(iter(graph.nodes))):
            start = graph.placeholder("prefix_output")
        last.replace_all_uses_with(start)
        suffix = _module(model, graph)
        image = [n for n in suffix.graph.nodes if n.op == "placeholder" and n.name != start.name]
        if any(n.users for n in image):
            return None  # the suffix still reads the image: not a clean cut
        for node in image:
            suffix.graph.erase_node(node)
        suffix.recompile()
    except Exception as exc:  # fx cannot trace every model (data-dependent control flow): no cut
        log.debug("cannot cut %s at %s: %s", type(model).__name__, cut, exc)
        return None
    return prefix, suffix


def checked_split(model: nn.Module, cut: str, image_size: int,
                  unfreeze: str | int | None = None) -> tuple[fx.GraphModule, fx.GraphModule] | None:
    """`split`, kept only where the two halves compute what the model does (in eval mode, on a
    probe batch at `image_size`), the cut's output is no larger than the image it replaces (else
    its cache would cost more disk than it saves time) and, given `unfreeze`, the prefix holds
    nothing that phase 2 trains (sets `model`'s requires_grad as `M.unfreeze` does)."""
    halves = split(model, cut)
    if halves is None:
        return None
    prefix, suffix = halves
    if unfreeze is not None:
        M.unfreeze(model, unfreeze)
        if any(p.requires_grad for p in prefix.parameters()):
            log.debug("%s's prefix up to %s holds parameters phase 2 trains: not cut", type(model).__name__, cut)
            return None
    p = next(model.parameters())
    probe = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(p.device)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            whole, middle = model(probe), prefix(probe)
            again = suffix(middle)
    finally:
        model.train(was_training)
    if middle[0].numel() > probe[0].numel():
        return None
    if not torch.allclose(whole, again, rtol=1e-4, atol=1e-4 * float(whole.abs().max()) + 1e-6):
        log.debug("cutting %s at %s changes its output: not cut", type(model).__name__, cut)
        return None
    return prefix, suffix


def suffix_of(model: nn.Module, cut: str) -> fx.GraphModule:
    """A trial's model after `cut` (its own modules): what phase 2 trains on cached prefix outputs."""
    halves = split(model, cut)
    if halves is None:  # the pipeline checked the same architecture: cannot happen
        raise RuntimeError(f"{type(model).__name__} cannot be cut at {cut!r}")
    return halves[1]
