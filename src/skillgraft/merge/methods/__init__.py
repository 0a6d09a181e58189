"""Every built-in merge method; importing this package registers them all."""

from skillgraft.merge.methods import (  # noqa: F401
    basic,
    breadcrumbs,
    consensus,
    dare,
    della,
    fisher,
    layer_swap,
    model_stock,
    nearswap,
    pcb,
    regmean,
    slerp,
    ties,
)
