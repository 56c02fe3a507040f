"""Off-policy influence (POPI, docs/design.md §2), free of any notion of a job,
a stage or a task: offline trajectories and their storage (`offline`), the
importance-weighted policy-gradient loss and its per-prompt gradients
(`popi`), the sparse random projection (`projection`, Triton kernels in
`_kernels`), projected gradients in the store (`gradstore`) and cosine
scores against the validation targets (`scoring`). The curriculum applies
them to a job's stages (`cropi.curriculum.influence`)."""
