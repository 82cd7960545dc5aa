"""Repair inside the search: the repair of one network as a traceable function of
the masks (:class:`Repair`), and a fitness that scores every individual after its
repair (:func:`repaired_fitness`).

Both methods have a fixed-shape, ``jit``/``vmap``-able form in the masks, with the
mask-free part (cosine similarities, Gram matrices) computed once. Least squares
here fits every consumer at once on the dense network's inputs; the layer after
layer fit of :func:`~gapruning.recover.sequential.sequential_lstsq` is not
vmappable.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ..models import Net, consumers
from ..zoo import Pretrained
from .lstsq import gram_matrices, lstsq_probes, refit
from .merging import merged_kernel, similarities
from .validate import RecoverError, lstsq_prior, repair_method, require_pretrained


class Repair:
    """The repair of one network, as a function of the masks.

    Built once (the mask-free part: cosine similarities, or Gram matrices on
    probes); ``repair.layers(masks)`` gives the repaired consumer weights and
    ``repair(masks)`` the whole network with them, both traceable and
    ``vmap``-able over a population of masks.

    Args:
        pretrained: the dense network.
        method: ``"merge"`` (Neuron Merging) or ``"lstsq"`` (least squares);
            ``"cosine"`` is a deprecated name of ``"merge"``.
        probes: model inputs for ``"lstsq"`` (an array, or a probe kind for
            :func:`~gapruning.make_probes`); unused by ``"merge"``.
        num_probes, seed: for probes made here.
        ridge: ``"lstsq"`` regularisation, relative to the mean Gram diagonal.
        threshold: Neuron Merging: merge only matches with a higher cosine.
        prior: ``"lstsq"``: what the ridge pulls the kept rows towards,
            ``"merge"`` (default: the Neuron Merging rows, so a large ``ridge``
            gives ``"merge"`` and a small one plain least squares) or
            ``"dense"`` (the pruned rows, unchanged: ThiNet's ridge).
    """

    def __init__(
        self,
        pretrained: Pretrained,
        method: str = "merge",
        probes=None,
        *,
        num_probes: int = 512,
        seed: int = 0,
        ridge: float = 1e-2,
        threshold: float = 0.0,
        prior: str = "merge",
    ):
        pretrained = require_pretrained(pretrained)
        method = repair_method(method)
        if ridge <= 0:
            raise RecoverError(f"ridge must be positive, got {ridge}")
        self.prior = lstsq_prior(prior)
        self.pretrained = pretrained
        self.method = method
        self.ridge = float(ridge)
        self.threshold = float(threshold)
        net = pretrained.model
        self.consumers = consumers(net)
        self.sizes = {g.name: g.size for g in pretrained.space.groups}
        self.similarities = {}
        if method == "merge" or self.prior == "merge":
            self.similarities = similarities(net, pretrained.space)
        if method == "merge":
            self.consumers = tuple(
                c for c in self.consumers if c.group in self.similarities
            )
        else:
            x = lstsq_probes(pretrained, probes, num_probes, seed)
            self.grams = gram_matrices(pretrained, x)

    def layers(self, masks: Mapping) -> dict[str, dict[str, jax.Array]]:
        """``{layer: {"kernel", "bias"?}}``: repaired weights of every consumer."""
        net = self.pretrained.model
        out = {}
        for c in self.consumers:
            layer = net.layers[c.layer]
            kernel = layer.kernel[...]
            mask = jnp.asarray(c.channel_mask(masks), jnp.float32)
            units = self.sizes[c.group] * c.unit
            merged = kernel
            if c.group in self.similarities:
                sim, norms = self.similarities[c.group]
                merged = merged_kernel(kernel, sim, norms, mask, units, self.threshold)
            if self.method == "merge":
                new = {"kernel": merged}
                if layer.bias is not None:
                    new["bias"] = layer.bias[...]
            else:
                prior = merged if self.prior == "merge" else None
                new = refit(layer, mask, units, self.grams[c.layer], self.ridge, prior)
            out[c.layer] = new
        return out

    def __call__(self, masks: Mapping) -> Net:
        """The dense-shaped network with repaired consumer weights."""
        return with_layers(self.pretrained.model, self.layers(masks))


def with_layers(net: Net, layers: Mapping) -> Net:
    """A copy of ``net`` with ``{layer: {"kernel", "bias"?}}`` replaced."""
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    for name, new in layers.items():
        pure["layers"][name].update(new)
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest)


def repaired_fitness(fit, method: str = "merge", probes=None, **options):
    """A copy of the composed fitness ``fit`` that scores every individual after
    its repair: ``fit.single(masks)`` runs on ``Repair(masks)``.

    Cost: per individual, the repaired consumer kernels are materialized
    (``population chunk x consumer weights`` more memory; the chunking of the
    fitness bounds it) and ``"lstsq"`` solves one ``rows x rows`` system per
    consumer (``rows`` = its fan-in), i.e. ``O(sum fan_in^3)`` flops per
    individual; ``"merge"`` costs one argmax and one ``units x units`` matmul per
    consumer. The weights of layers that read no pruned tensor stay shared.

    Args:
        fit: a :class:`~gapruning.fitness.compose.Fitness`.
        method, probes, **options: as :class:`Repair`. ``"lstsq"`` defaults to
            probes of the fitness's kind with seed 1 (``compose``'s default seed
            is 0), so it is not fit on the very probes it is scored on.
    """
    if probes is None and fit.probe_kind not in (None, "array"):
        probes = fit.probe_kind
    options.setdefault("seed", 1)
    return fit.with_repair(Repair(fit.pretrained, method, probes, **options))
