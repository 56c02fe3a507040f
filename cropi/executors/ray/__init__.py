"""Ray executors: the projection pool, the Ray Serve rollout service, the Ray
Train + DeepSpeed ZeRO-3 trainer and the trainer -> rollout weight sync.

Importing these modules needs the `ray` extra (ray[serve,train], deepspeed);
the inline executor and the rest of the library never import them.
"""
