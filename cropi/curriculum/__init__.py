"""The curriculum: which prompts each stage trains on and how a stage runs.
Selectors and the stored selection of a stage, the influence engine that
scores prompts at a stage's start, the stage loop every executor runs
(`stage`), the controller's stage machine, and the store layout of a job."""
