"""Every built-in merge method; importing this package registers them all."""

from skillgraft.merge.methods import (  # noqa: F401
    arcee_fusion,
    basic,
    breadcrumbs,
    consensus,
    dare,
    della,
    fisher,
    karcher,
    layer_swap,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    pcb,
    ram,
    regmean,
    sce,
    slerp,
    ties,
)
