"""`mstar plan`: per-device memory of training and rollouts for a preset, mesh, batch and remat policy.

The bytes come from the model's abstract parameters (`jax.eval_shape`, laid out by the mesh's shardings) and
from the compiled train step's `memory_analysis()` on simulated CPU devices, not from formulas. `families`
lists the models that can be planned, `devices` the accelerators' memory, `footprint` compiles one candidate,
`planner` checks a request, says whether it fits and searches for a mesh and remat policy that do.
"""
