"""The trainer service: `cropi serve trainer`.

It claims `train` tasks from Redis; for `executor: ray` jobs each task is one
Ray Train run of DeepSpeed ZeRO-3 ranks (`cropi.executors.ray.stage`,
`cropi.rl.zero3`) that samples on the Ray Serve rollout service
(`services.rollout.app`) and pushes its weights to it after every step
(`cropi.executors.ray.weight_sync`).
"""
