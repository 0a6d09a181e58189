"""Passthrough: the base's tensors, unchanged — with a layout (mergekit ``slices``), a frankenmerge's blocks.

There is nothing to merge: the engine copies each tensor of the base (or of the layout's view) as it is.
"""

from __future__ import annotations

import torch

from skillgraft.merge.registry import NoParams, TensorJob, merge_method


@merge_method("passthrough", NoParams, min_inputs=0, max_inputs=0)
def passthrough(job: TensorJob, p: NoParams) -> torch.Tensor:
    """Passthrough: Δ = 0 — every tensor is the base's, unchanged; it takes no inputs besides the base.

    Its use is with a layer layout (mergekit ``slices`` with one source each): the base is then the view
    whose block ``offset + k`` is source block ``start + k`` of each slice (see ``merge/layout.py``), so the
    output stacks the named blocks of the named models ("frankenmerge"); embeddings come from the first slice's
    model, the final norm and head from the last slice's, config.json from ``base_model`` (else the first
    slice's model) with ``num_hidden_layers`` set to the stacked count. A plain passthrough of one model copies
    it. Edge cases: none — there is no arithmetic; called directly on deltas it returns zeros. Compute dtype: none
    (no fp32 or other arithmetic; tensors are copied, and a mergekit ``dtype`` or ``out_dtype`` casts them). mergekit's
    per-model ``scale`` is not implemented (refused by name). Reference: mergekit ``passthrough``.
    """
    return torch.zeros(job.deltas.shape[1:], dtype=job.deltas.dtype)
