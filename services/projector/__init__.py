"""The projector service: `cropi serve projector [--parallel N]`.

It claims `project` tasks from Redis; for `executor: ray` jobs it runs them on
the gradient-projection pool (`cropi.executors.ray.projection_pool`: Ray actors
that keep the stage's policy loaded), N at a time.
"""
